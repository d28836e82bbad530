"""Curation stages that read a model: ``tag``, ``score``, ``expand``, ``rewrite``; and the built-in taggers.

Each names the config section whose model it reads (``model: teacher``, or ``student``/``reference``, e.g. a
mid-size model closer to the student for the self-distillation rewrite), a model in process or a server
(``teacher.server``). Every answer is sampled per record id, so a killed run rerun writes the same rows.

* ``tag``: labels each record's task (``field``, default ``task``) with a tagger of the ``register_taggers``
  hook over a taxonomy (``taxonomy``: a YAML list of ``{name, en, keywords}``; by default the 33 task types
  of ``task_taxonomy.yaml``). Built-in taggers: ``keywords`` counts each type's keywords in the instruction
  (English as whole words, Chinese as substrings; ties to the earlier type; none: the last type);
  ``model`` is the teacher as a classifier: it scores ``log p(label | prompt)``, the summed log-probs of each
  label's words as the reply to ``template`` (instruction and label list filled in), and picks the largest,
  so its answer is always one of the labels.
* ``score``: any scorer of ``register_scorers`` (``mfd``, ``judge`` with ``judge: teacher``, a plugin's) as a
  gate: writes the score to ``field`` (default ``score``) and drops records below ``min`` or above ``max``.
* ``expand``: the teacher writes new records from each one, per ``modes``: ``same_task`` (a new instruction of
  the same task with other content), ``language`` (the task in the other language: English to Chinese,
  Chinese to English) and ``follow_up`` (a question strictly about the previous answer, appended to the
  conversation); then answers it. New rows get the id ``ID-MODE-K``, the source's ``task`` and a
  ``provenance`` entry; the pipeline marks each with the id it came from. Put ``dedup`` after it: new rows
  can repeat old ones.
* ``rewrite``: replaces each reply with the model's rewrite: ``style: task_aware`` (step by step for
  reasoning and maths, commented code for code, detailed and structured for writing, precise but complete
  otherwise, by the record's ``task``), or ``concise`` ("precise but complete"), or a ``template`` of one's
  own. The id stays; ``provenance`` gains the rewrite; an empty rewrite keeps the reply.
"""

from __future__ import annotations

import re
from pathlib import Path

from distillzoo.curate.pipeline import Stage, Tagger
from distillzoo.curate.text import instruction_text, response_text
from distillzoo.errors import ConfigError, ParameterError
from distillzoo.hooks.hookspecs import hookimpl

TAXONOMY = Path(__file__).with_name("task_taxonomy.yaml")
LANGUAGES = {"en": "English", "zh": "Chinese"}


def read_taxonomy(path: str | Path | None = None) -> list[dict]:
    """The task types of a taxonomy file, each ``{name, en, keywords}``, checked: unique names, a list."""
    import yaml

    path = Path(path) if path is not None else TAXONOMY
    try:
        types = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ParameterError(f"tag.taxonomy: cannot read {path}: {e}") from None
    if not isinstance(types, list) or not types or not all(isinstance(t, dict) and t.get("name") for t in types):
        raise ParameterError(f"tag.taxonomy: {path} must be a list of {{name, en, keywords}}")
    names = [str(t["name"]) for t in types]
    if len(set(names)) != len(names):
        raise ParameterError(f"tag.taxonomy: {path} names a type twice: "
                             f"{sorted({n for n in names if names.count(n) > 1})}")
    return [{"name": str(t["name"]), "en": str(t.get("en", t["name"])), "keywords": list(t.get("keywords") or [])}
            for t in types]


def _sampling(max_new_tokens, temperature, seed):
    from distillzoo.models.generation import Sampling

    return Sampling(int(max_new_tokens), float(temperature), seed=int(seed))


def _language(row) -> str:
    from distillzoo.curate.report import language_of

    found = language_of(row)
    return found if found in LANGUAGES else "en"


def _fill(template: str, where: str, **values) -> str:
    try:
        return template.format(**values)
    except (KeyError, IndexError, ValueError) as e:
        raise ParameterError(f"{where}: template: {type(e).__name__}: {e}; it may name "
                             f"{', '.join('{' + k + '}' for k in values)} (write a literal brace as {{ or }})") from None


# ---------------------------------------------------------------------------------------------- tag
class KeywordTagger(Tagger):
    name = "keywords"

    def begin(self, context, types) -> None:
        self.types = types
        self.patterns = []
        for t in self.types:
            words = [k.lower() for k in t["keywords"] if k.isascii()]
            self.patterns.append((re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b") if words else None,
                                  [k for k in t["keywords"] if not k.isascii()]))

    def tag(self, rows):
        out = []
        for row in rows:
            text = instruction_text(row.fields)
            lower = text.lower()
            hits = [(len(p.findall(lower)) if p is not None else 0) + sum(text.count(k) for k in zh)
                    for p, zh in self.patterns]
            best = max(range(len(hits)), key=lambda i: (hits[i], -i))
            label = self.types[best]["name"] if hits[best] else self.types[-1]["name"]
            out.append((label, {"hits": hits[best]}))
        return out


CLASSIFY_TEMPLATE = ("Classify the task of the instruction below. The task types are: {labels}.\n\n"
                     "Instruction:\n{instruction}\n\nReply with the task type only.")


class ModelTagger(Tagger):
    """The teacher as a classifier, constrained to the label set: ``argmax_label log p(label words | prompt)``."""

    name = "model"

    def __init__(self, model: str = "teacher", template: str = CLASSIFY_TEMPLATE) -> None:
        self.role, self.template = model, template
        self.roles = (model,)
        _fill(template, "tag", labels="", instruction="")

    def begin(self, context, types) -> None:
        self.model = context.model(self.role, "tag")
        self.tokenizer = context.tokenizer
        self.types = types
        self.words = [t["en"] for t in self.types]
        self.label_ids = [self.tokenizer.encode(w) for w in self.words]

    def prompt(self, row) -> list[int]:
        """The prompt whose continuation each label is: the template as a user turn, then the assistant's turn."""
        ask = _fill(self.template, "tag", labels=", ".join(self.words), instruction=instruction_text(row.fields))
        return self.tokenizer.encode_prompt([{"role": "user", "content": ask}], None)

    def logprobs(self, row) -> list[float]:
        """``log p(label words | prompt)`` per type, in taxonomy order."""
        from distillzoo.curate.models import continuation_logprobs

        return continuation_logprobs(self.model, self.prompt(row), self.label_ids, row.id)

    def tag(self, rows):
        out = []
        for row in rows:
            scores = self.logprobs(row)
            best = max(range(len(scores)), key=lambda i: (scores[i], -i))
            out.append((self.types[best]["name"], {"logprob": round(scores[best], 6)}))
        return out


class Tag(Stage):
    name = "tag"

    def __init__(self, tagger: str = "keywords", field: str = "task", taxonomy: str | None = None, **params) -> None:
        from distillzoo.errors import UnknownNameError, did_you_mean
        from distillzoo.hooks.manager import components

        found = components("taggers")
        if tagger not in found:
            raise UnknownNameError(f"tag.tagger: unknown tagger {tagger!r}. Available: {', '.join(sorted(found))}."
                                   + did_you_mean(str(tagger), found))
        try:
            self.tagger = found[tagger].obj(**params)
        except TypeError as e:
            raise ParameterError(f"tag: tagger {tagger!r}: {e}") from None
        self.field, self.types = str(field), read_taxonomy(taxonomy)
        self.roles = tuple(self.tagger.roles)
        self.counts: dict[str, int] = {}

    def begin(self, context) -> None:
        self.tagger.begin(context, self.types)
        self.names = {t["name"] for t in self.types}

    def transform(self, rows):
        tags = self.tagger.tag(rows)
        if len(tags) != len(rows):
            raise ParameterError(f"tag: tagger {self.tagger.name!r} gave {len(tags)} labels for {len(rows)} records")
        out = []
        for row, (label, _) in zip(rows, tags):
            if label not in self.names:
                raise ParameterError(f"tag: tagger {self.tagger.name!r} labelled {row.where} {label!r}, which the "
                                     f"taxonomy does not name")
            self.counts[label] = self.counts.get(label, 0) + 1
            out.append([{**row.record, self.field: label}])
        return out

    def summary(self) -> dict:
        return {"tags": dict(sorted(self.counts.items()))}


# ---------------------------------------------------------------------------------------------- score
class Score(Stage):
    name = "score"

    def __init__(self, scorer: dict | None = None, min: float | None = None, max: float | None = None,
                 field: str = "score", batch_size: int = 8, max_length: int | None = None) -> None:
        from distillzoo.teacher.scoring import make_scorer

        if not isinstance(scorer, dict):
            raise ParameterError("score.scorer: give {name: mfd | judge | a plugin's, ...params}")
        self.scorer = make_scorer(scorer, "score.scorer")
        self.min, self.max, self.field = min, max, str(field)
        self.batch_size, self.max_length = int(batch_size), max_length
        self.roles = tuple(self.scorer.needs)

    def begin(self, context) -> None:
        self.context = context
        self.models = {role: context.model(role, "score") for role in self.roles}

    def transform(self, rows):
        import json
        import tempfile

        from distillzoo.teacher.scoring import score_samples

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "shard.jsonl"
            path.write_text("".join(json.dumps(r.record, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            scores = score_samples(self.scorer, path, self.context.section["format"], self.context.tokenizer,
                                   teacher=self.models.get("teacher"), student=self.models.get("student"),
                                   max_length=self.max_length, batch_size=self.batch_size,
                                   columns=self.context.section.get("columns"))
        out = []
        for row in rows:
            value = scores[row.id]
            if self.min is not None and value < self.min:
                out.append(("score below min", {"score": value, "min": self.min}))
            elif self.max is not None and value > self.max:
                out.append(("score above max", {"score": value, "max": self.max}))
            else:
                out.append([{**row.record, self.field: value}])
        return out


# ---------------------------------------------------------------------------------------------- expand
EXPAND_TEMPLATES = {
    "same_task": {
        "en": "Here is an instruction:\n\n{instruction}\n\nWrite one new instruction of the same kind of task ({task}) "
              "with different content. Reply with the new instruction only.",
        "zh": "下面是一条指令：\n\n{instruction}\n\n请写一条任务类型相同（{task}）但内容不同的新指令。只回复新指令。"},
    "language": {
        "en": "Here is an instruction in English:\n\n{instruction}\n\nWrite an instruction in Chinese that asks for the "
              "same kind of task with different content. Reply with the new instruction only.",
        "zh": "下面是一条中文指令：\n\n{instruction}\n\n请用英文写一条任务类型相同、内容不同的新指令。只回复新指令。"},
    "follow_up": {
        "en": "Here is a conversation:\n\n{conversation}\n\nWrite one follow-up question the user could ask next that "
              "is strictly about the assistant's last answer. Reply with the question only.",
        "zh": "下面是一段对话：\n\n{conversation}\n\n请写一个用户接下来可能提出的追问，必须严格针对助手的上一个回答。只回复问题。"},
}
EXPAND_MODES = tuple(EXPAND_TEMPLATES)


def _chat_only(context, stage: str) -> None:
    if context.section["format"] != "chat":
        raise ConfigError(f"{context.where}: curate.stages: {stage} writes chat records, and curate.format is "
                          f"{context.section['format']!r}; curate chat records (format: chat) with it")


class Expand(Stage):
    name = "expand"

    def __init__(self, model: str = "teacher", modes=("same_task",), per_record: int = 1,
                 source_language: str | None = None, templates: dict | None = None, max_new_tokens: int = 256,
                 temperature: float = 0.7, seed: int = 0, batch_size: int = 8) -> None:
        modes = [modes] if isinstance(modes, str) else list(modes or [])
        bad = [m for m in modes if m not in EXPAND_MODES]
        if not modes or bad:
            raise ParameterError(f"expand.modes: {bad or modes!r}: choose from {list(EXPAND_MODES)}")
        if not isinstance(per_record, int) or per_record < 1:
            raise ParameterError(f"expand.per_record: an integer >= 1, got {per_record!r}")
        if source_language is not None and source_language not in LANGUAGES:
            raise ParameterError(f"expand.source_language: one of {list(LANGUAGES)}, got {source_language!r}")
        self.templates = {m: dict(EXPAND_TEMPLATES[m]) for m in modes}
        for mode, given in (templates or {}).items():
            if mode not in self.templates or not isinstance(given, dict):
                raise ParameterError(f"expand.templates: {{mode: {{en: ..., zh: ...}}}} for the modes {modes}, "
                                     f"got {mode!r}")
            self.templates[mode].update(given)
        self.role, self.modes, self.per_record, self.source_language = model, modes, per_record, source_language
        self.sampling = _sampling(max_new_tokens, temperature, seed)
        self.batch_size, self.roles = int(batch_size), (model,)
        self.empty = 0

    def begin(self, context) -> None:
        _chat_only(context, "expand")
        self.model, self.tokenizer = context.model(self.role, "expand"), context.tokenizer

    def _ask(self, row, mode: str) -> str:
        language = _language(row)
        messages = row.fields["messages"]
        conversation = "\n\n".join(f"{m['role']}: {m['content']}" for m in messages if m["role"] != "system")
        return _fill(self.templates[mode][language], f"expand.templates.{mode}.{language}",
                     instruction=instruction_text(row.fields), task=row.record.get("task", "general"),
                     conversation=conversation)

    def transform(self, rows):
        from distillzoo.curate.models import generate

        jobs = [(row, mode, k) for row in rows if self.source_language in (None, _language(row))
                for mode in self.modes for k in range(self.per_record)]
        if not jobs:
            return [[row.record] for row in rows]
        new_id = lambda row, mode, k: f"{row.id}-{mode}-{k}"  # noqa: E731
        asks = generate(self.model, self.tokenizer, [[{"role": "user", "content": self._ask(*job[:2])}] for job in jobs],
                        [new_id(*job) + "/instruction" for job in jobs], self.sampling, batch_size=self.batch_size)
        conversations = []
        for (row, mode, k), ask in zip(jobs, asks):
            before = [m for m in row.fields["messages"] if m["role"] != "system"] if mode == "follow_up" else []
            conversations.append([*before, {"role": "user", "content": ask}])
        keep = [n for n, ask in enumerate(asks) if ask]
        answers = {} if not keep else dict(zip(keep, generate(self.model, self.tokenizer, [conversations[n] for n in keep],
                                          [new_id(*jobs[n]) + "/answer" for n in keep], self.sampling,
                                          batch_size=self.batch_size)))
        added: dict[str, list[dict]] = {row.id: [] for row in rows}
        for n, (row, mode, k) in enumerate(jobs):
            if not answers.get(n):
                self.empty += 1  # no instruction or no answer came back: no row
                continue
            language = _language(row)
            if mode == "language":
                language = "zh" if language == "en" else "en"
            task = {"task": row.record["task"]} if "task" in row.record else {}
            added[row.id].append({"id": new_id(row, mode, k),
                                  "messages": [*conversations[n], {"role": "assistant", "content": answers[n]}],
                                  **task, "language": language,
                                  "provenance": [*row.record.get("provenance", []),
                                                 {"stage": "expand", "mode": mode, "from": row.id,
                                                  "model": self.role}]})
        return [[row.record, *added[row.id]] for row in rows]

    def summary(self) -> dict:
        return {"empty": self.empty}


# ---------------------------------------------------------------------------------------------- rewrite
STYLES = {
    "reasoning": "step by step, each step explained, ending with the final answer",
    "code": "as working code with comments that explain each part, then a short explanation",
    "writing": "in detail and well structured",
    "concise": "precisely but completely: keep every fact and step that answers the instruction, drop the rest",
}
#: the styles as the Chinese template asks for them
STYLES_ZH = {
    "reasoning": "逐步推理，解释每一步，最后给出答案",
    "code": "给出可运行的代码，用注释解释每个部分，再附简短说明",
    "writing": "内容详细，结构清晰",
    "concise": "准确而完整：保留回答指令所需的每个事实和步骤，删去其余内容",
}
#: which style ``task_aware`` gives a record, by its ``task`` (types not listed: ``concise``)
TASK_STYLES = {"math": "reasoning", "logical_reasoning": "reasoning", "data_analysis": "reasoning",
               "code_generation": "code", "code_debugging": "code", "creative_writing": "writing",
               "academic_writing": "writing", "business_writing": "writing"}
REWRITE_TEMPLATE = {
    "en": "Rewrite the answer to the instruction below {style}. Reply with the rewritten answer only.\n\n"
          "Instruction:\n{instruction}\n\nAnswer:\n{answer}",
    "zh": "请改写下面指令的回答，要求：{style}。只回复改写后的回答。\n\n指令：\n{instruction}\n\n回答：\n{answer}"}


class Rewrite(Stage):
    name = "rewrite"

    def __init__(self, model: str = "teacher", style: str = "task_aware", template: dict | str | None = None,
                 max_new_tokens: int = 512, temperature: float = 0.0, seed: int = 0, batch_size: int = 8) -> None:
        if style not in ("task_aware", *STYLES):
            raise ParameterError(f"rewrite.style: {style!r}: choose from {['task_aware', *STYLES]}")
        self.templates = dict(REWRITE_TEMPLATE)
        if isinstance(template, str):
            self.templates = {"en": template, "zh": template}
        elif isinstance(template, dict):
            self.templates.update(template)
        for language, text in self.templates.items():
            _fill(text, f"rewrite.template.{language}", style="", instruction="", answer="")
        self.role, self.style, self.roles = model, style, (model,)
        self.sampling = _sampling(max_new_tokens, temperature, seed)
        self.batch_size = int(batch_size)
        self.kept_original = 0

    def begin(self, context) -> None:
        _chat_only(context, "rewrite")
        self.model, self.tokenizer = context.model(self.role, "rewrite"), context.tokenizer

    def style_of(self, row) -> str:
        """The style a record is rewritten in: ``style``, or with ``task_aware`` the one its task calls for."""
        if self.style != "task_aware":
            return self.style
        return TASK_STYLES.get(str(row.record.get("task")), "concise")

    def transform(self, rows):
        from distillzoo.curate.models import generate

        asks = [[{"role": "user", "content": _fill(self.templates[_language(row)], "rewrite.template",
                                                   style=(STYLES_ZH if _language(row) == "zh" else
                                                          STYLES)[self.style_of(row)],
                                                   instruction=instruction_text(row.fields),
                                                   answer=response_text(row.fields))}] for row in rows]
        answers = generate(self.model, self.tokenizer, asks, [f"{row.id}/rewrite" for row in rows], self.sampling,
                           batch_size=self.batch_size)
        out = []
        for row, answer in zip(rows, answers):
            if not answer:
                self.kept_original += 1
                out.append([row.record])
                continue
            messages = [dict(m) for m in row.record["messages"]]
            messages[-1]["content"] = answer
            out.append([{**row.record, "messages": messages,
                         "provenance": [*row.record.get("provenance", []),
                                        {"stage": "rewrite", "style": self.style_of(row), "model": self.role,
                                         "replaced_chars": len(response_text(row.fields))}]}])
        return out

    def summary(self) -> dict:
        return {"kept_original": self.kept_original}


@hookimpl
def register_curation_stages(register):
    register("tag", Tag, summary="label each record's task with a tagger (keywords, the teacher as a classifier)")
    register("score", Score, summary="a scorer (mfd, judge, a plugin's) as a gate: drop below min or above max")
    register("expand", Expand, summary="the teacher writes new records: same task, other language, follow-ups")
    register("rewrite", Rewrite, summary="the teacher (or a second model) rewrites replies, by task or concisely")


@hookimpl
def register_taggers(register):
    register("keywords", KeywordTagger, summary="counts the taxonomy's keywords in the instruction (en, zh)")
    register("model", ModelTagger, summary="the teacher as a classifier: argmax over labels of log p(label | prompt)")
