"""Built-in training algorithms, registered through ``register_algorithms`` like any plugin's.

* ``distill``: logit-level distillation. The objective (fkl, jsd, a mixture, ...)
  on the next-token distributions of teacher and student along the data's replies,
  from a live teacher or a top-k teacher cache; with ``train.on_policy`` (GKD's λ)
  a step trains on the student's own samples instead.
* ``preference``: preference optimisation (dpo, simpo, any ``PreferenceObjective``)
  on chosen/rejected pairs. The reference is a live model (the teacher, or a
  ``reference:`` model), a frozen copy of the student's starting weights (TRL's
  default), the records' ``reference_*_logps`` columns, or a reference cache.
* ``dpkd``: Direct Preference Knowledge Distillation (Li, Gu, Dong et al. 2024). The
  teacher is the reference and the author of y_w; y_l is the student's own response,
  read from a pairs file (``distillzoo generate`` mode ``pairs``) or, with
  ``online: true``, sampled by the student during training, seeded by step and sample
  id, against the records' replies (the teacher's answers) as y_w.

Each micro-batch's loss is summed over its units (tokens, or pairs) and the loop
divides by the step's global count; policy log-probs go through the fused
sequence log-prob path (no ``[2B, T, V]`` tensor).
"""

from __future__ import annotations

import copy

import torch

from distillzoo.algorithm import Algorithm, MicroBatch, StepLoss, instruction_batches
from distillzoo.causal_lm import SequenceLogps, lm_head_weight, model_given, require_model
from distillzoo.data import IGNORE_INDEX, PreferenceExample, as_token_ids, collate_preference
from distillzoo.errors import ConfigError, DataError, DistillzooError, NonFiniteError
from distillzoo.generation import Sampling, sample_seed, split_last_reply, student_samples
from distillzoo.hookspecs import hookimpl
from distillzoo.kernels import token_logprobs
from distillzoo.preference import preference_loss


# ---------------------------------------------------------------------------- distill
def on_policy_step(seed: int, step: int, probability: float) -> bool:
    """Whether step ``step`` trains on student samples: the same on every rank, and after a resume."""
    return torch.rand((), generator=torch.Generator().manual_seed(sample_seed(seed, f"on-policy:{step}"))) < probability


def step_sampling(max_new_tokens: int, temperature: float, seed: int, step: int) -> Sampling:
    """The sampling of step ``step``'s student samples; each example's generator adds its sample id."""
    return Sampling(max_new_tokens, temperature, seed=seed * 1_000_003 + step)


class LogitDistillation(Algorithm):
    name = "distill"
    summary = ("logit-level KD: the objective on teacher and student next-token distributions along the data's "
               "replies (live teacher or top-k cache); train.on_policy mixes in the student's own samples (GKD)")
    paper = {"title": "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
             "authors": "Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist, Bachem", "year": 2024,
             "url": "https://arxiv.org/abs/2306.13649"}
    objective_kinds = ("logit",)
    records = "instruction"
    reads_on_policy = True
    cache = None

    def reads(self, cfg):
        return {"teacher"}  # a model or a cache; a teacher named for a ce run reports eval/kl_teacher_student

    def _cache_given(self, cfg) -> bool:
        return cfg.teacher is not None and cfg.teacher.cache is not None

    def roles(self, cfg):
        if self._cache_given(cfg):
            return {}
        needed = bool(self.objective.needs_teacher)
        # a teacher named for a ce run is loaded only to report eval/kl_teacher_student
        return {"teacher": needed} if needed or (cfg.data is not None and cfg.data.eval is not None) else {}

    def check(self, cfg, where):
        t = cfg.train
        if not 0 <= t.on_policy <= 1:
            raise ConfigError(f"{where}: train.on_policy: {t.on_policy} is not a probability in [0, 1]")
        if t.on_policy:
            if self._cache_given(cfg):
                raise ConfigError(f"{where}: train.on_policy: a teacher cache covers the data's responses only; the "
                                  "student's own samples need a live teacher (teacher.path or teacher.tiny)")
            try:
                step_sampling(t.on_policy_max_new_tokens, t.on_policy_temperature, cfg.seed, 0)
            except DistillzooError as e:
                raise ConfigError(f"{where}: train.on_policy_*: {e}") from None
        teacher = cfg.teacher
        sources = [] if teacher is None else [key for key in ("path", "tiny", "cache") if teacher[key] is not None]
        if self.objective.needs_teacher and len(sources) != 1:
            raise ConfigError(f"{where}: teacher: the objective needs a teacher; give one of teacher.path, teacher.tiny "
                              f"or teacher.cache{f' (got {sources})' if sources else ''}")
        if self._cache_given(cfg):
            self.cache = _open_teacher_cache(cfg, self.objective, where)

    def prepare(self, run):
        if self.cache is not None:
            self.cache.check(f"{run.where}: teacher.cache", vocab_size=lm_head_weight(run.student).shape[0])

    def micro_batches(self, run, examples, step, size):
        t = run.cfg.train
        if t.on_policy and on_policy_step(run.seed, step, t.on_policy):
            sampling = step_sampling(t.on_policy_max_new_tokens, t.on_policy_temperature, run.seed, step)
            examples = run.call(lambda models: student_samples(models.student, run.tokenizer, examples, sampling))
        batches = instruction_batches(examples, size, run.tokenizer.pad_id, run.device)
        if self.cache is not None:
            from distillzoo.teacher_cache import token_fingerprint

            for start, b in zip(range(0, len(examples), size), batches):
                fingerprints = [token_fingerprint(ex) for ex in examples[start:start + size]]
                b.inputs["sparse"] = self.cache.sparse_teacher(_sample_ids(b.inputs["ids"], run.where),
                                                               b.inputs["targets"], fingerprints)
        return batches

    def loss(self, models, batch):
        x = batch.inputs
        hs = models.hidden(models.student, x["input_ids"], x["attention_mask"])
        ws = models.head(models.student)
        teacher, wt = x.get("sparse"), None
        if teacher is None and self.objective.needs_teacher:
            with torch.no_grad():
                teacher = models.hidden(models.teacher, x["input_ids"], x["attention_mask"])
                wt = models.head(models.teacher)
        try:
            value = self.objective.from_hidden(hs, ws, teacher, wt, x["targets"])
        except NonFiniteError as e:  # name the sample the row belongs to, and where the teacher came from
            source = f"the teacher cache {self.cache.path}" if self.cache is not None else "the teacher model"
            raise NonFiniteError(f"{source}, {_row_of(e.row, x)}: {e}", e.row) from None
        # a mixture's per-term losses are means over the micro-batch's tokens; the loop wants sums
        terms = getattr(self.objective, "term_losses", {})
        return StepLoss(value, {f"loss/{name}": v * batch.count for name, v in terms.items()})


def _row_of(row: int | None, inputs: dict) -> str:
    """'sample ID, scored token N' for a row of the flattened ``[B, T-1]`` targets of a micro-batch."""
    if row is None:
        return "a batch"
    targets = inputs["targets"]
    b, t = divmod(row, targets.shape[1])
    n = int((targets[b, :t] != IGNORE_INDEX).sum())
    return f"sample {inputs['ids'][b]!r}, scored token {n} (position {t + 1})"


def _open_teacher_cache(cfg, objective, where: str):
    """The teacher cache, refused unless its manifest agrees with the config (k, tokenizer, temperature)."""
    from distillzoo.base import Mixture
    from distillzoo.teacher_cache import TeacherCache
    from distillzoo.tokenizer import load_tokenizer

    try:
        cache = TeacherCache(cfg.teacher.cache)
    except DistillzooError as e:
        raise ConfigError(f"{where}: teacher.cache: {e}") from None
    terms = objective.terms if isinstance(objective, Mixture) else [objective]
    dense_only = [t.name for t in terms if t.needs_teacher and not t.accepts_sparse_teacher]
    if dense_only:
        raise ConfigError(f"{where}: teacher.cache: {', '.join(dense_only)} cannot take a top-k (sparse) teacher; a "
                          "cache works with the objectives that accept one (fkl, rkl, jsd, skl, srkl, tvd)")
    temperatures = {float(t.temperature) for t in terms if getattr(t, "needs_teacher", False)}
    if len(temperatures) > 1:
        raise ConfigError(f"{where}: objectives: a teacher cache holds one temperature; the terms use {sorted(temperatures)}")
    tokenizer = load_tokenizer(cfg.data.tokenizer if cfg.data is not None else None).name
    cache.check(f"{where}: teacher.cache", k=cfg.teacher.top_k, tokenizer=tokenizer,
                temperature=temperatures.pop() if temperatures else None)
    return cache


def _sample_ids(ids: list, where: str) -> list:
    if any(i is None for i in ids):
        raise DataError(f"{where}: teacher.cache: an example has no sample id (a data directory from an older "
                        "distillzoo prepare? prepare it again); the cache is read by id")
    return ids


# ---------------------------------------------------------------------------- preference
REFERENCES = ("auto", "initial", "teacher", "model", "cache", "data")


class PreferenceOptimisation(Algorithm):
    name = "preference"
    summary = ("preference optimisation (dpo and its loss types, simpo, any PreferenceObjective) on chosen/rejected "
               "pairs; the reference is a live model, a frozen copy of the starting student, a data column or a cache")
    paper = {"title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
             "authors": "Rafailov, Sharma, Mitchell, Ermon, Manning, Finn", "year": 2023,
             "url": "https://arxiv.org/abs/2305.18290"}
    params = {"reference": {
        "type": "str", "default": "auto", "choices": list(REFERENCES),
        "doc": "where log rho comes from: initial (a frozen copy of the student's starting weights, TRL's default), "
               "teacher, model (the reference: section's model), cache (reference.cache, a distillzoo reference-cache "
               "file), data (the records' reference_chosen_logps / reference_rejected_logps); auto: the reference: "
               "section when given, else initial (none for reference-free objectives such as simpo)"}}
    objective_kinds = ("preference",)
    records = "preference"
    eval_records = "preference"
    unit = "pairs"
    progress_metrics = ("rewards/accuracies",)
    source: str | None = None
    reference_cache = None

    def check(self, cfg, where):
        section = cfg.reference
        given = section is not None and (model_given(section) or section.cache is not None)
        if not self.objective.needs_reference:
            if self.reference != "auto" or given:
                what = f"algorithm.reference: {self.reference!r}" if self.reference != "auto" else "reference: a section"
                raise ConfigError(f"{where}: {what} is given, but objective {self.objective.name!r} is reference-free; "
                                  "remove it (algorithm.reference takes only 'auto' here)")
            self.source = None
            return
        source = self.reference
        if source == "auto":
            source = ("cache" if section.cache is not None else "model") if given else "initial"
        if source in ("model", "cache"):
            _check_reference_section(section, source, where)
        elif given:
            raise ConfigError(f"{where}: reference: a reference section is given, but algorithm.reference is "
                              f"{source!r}; remove the section or set algorithm.reference to 'model' or 'cache'")
        if source == "teacher":
            require_model(cfg, "teacher", f"algorithm.reference 'teacher' (algorithm {self.name!r})", where)
        if source == "cache":
            from distillzoo.reference_cache import ReferenceCache

            try:
                self.reference_cache = ReferenceCache(section.cache)
            except DistillzooError as e:
                raise ConfigError(f"{where}: reference.cache: {e}") from None
        self.source = source

    def roles(self, cfg):
        return {"reference": True} if self.source == "model" else {"teacher": True} if self.source == "teacher" else {}

    def reads(self, cfg):
        return set(self.roles(cfg)) | ({"reference"} if self.source == "cache" else set())

    def prepare(self, run):
        if self.source == "initial":  # taken before a checkpoint loads: the starting weights, also on resume
            run.reference = copy.deepcopy(run.student).eval().requires_grad_(False)
        elif self.source == "cache":
            for dataset in run.datasets:
                dataset.attach_reference(self.reference_cache)
        elif self.source == "data":
            for dataset in run.datasets:
                missing = [ex.where for ex in dataset.examples if ex.reference_chosen_logps is None]
                if missing:
                    raise DataError(f"{missing[0]}: algorithm.reference is 'data' but the record carries no "
                                    f"reference_chosen_logps / reference_rejected_logps ({len(missing)} records lack "
                                    "them); add them, or use a reference model or cache")

    def micro_batches(self, run, examples, step, size):
        out = []
        for start in range(0, len(examples), size):
            batch = collate_preference(examples[start:start + size], run.tokenizer.pad_id).to(run.device)
            out.append(MicroBatch({"batch": batch}, batch.n_pairs, int((batch.labels != IGNORE_INDEX).sum())))
        return out

    def _reference_model(self, models):
        return {"initial": models.reference, "model": models.reference, "teacher": models.teacher}.get(self.source)

    def loss(self, models, batch):
        b = batch.inputs["batch"]
        policy = sequence_logps(models, models.student, b)
        ref_model, reference = self._reference_model(models), None
        if ref_model is not None:
            with torch.no_grad():
                reference = sequence_logps(models, ref_model, b)
        value = preference_loss(self.objective, b, policy, reference, models.student, ref_model)
        # the objective's metrics are means over the micro-batch's pairs; the loop wants sums
        return StepLoss(value, {k: v * b.n_pairs for k, v in self.objective.metrics.items()})

    def eval_batches(self, run, examples, size):
        return self.micro_batches(run, examples, -1, size)

    def eval_loss(self, models, batch):
        out = self.loss(models, batch)
        return StepLoss(out.value.detach(), {"loss": out.value.detach(), **out.metrics})


def _check_reference_section(section, source: str, where: str) -> None:
    if section is None:
        raise ConfigError(f"{where}: reference: algorithm.reference {source!r} needs a reference section: "
                          + ("{path: MODEL_DIR} or {tiny: {...}}" if source == "model" else "{cache: FILE}"))
    if section.top_k is not None:
        raise ConfigError(f"{where}: reference.top_k: a reference takes no top_k (that is for a teacher cache)")
    kinds = [k for k in ("path", "tiny", "cache") if section[k] is not None]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: reference: give exactly one of reference.path, reference.tiny or reference.cache "
                          f"(got {kinds})")
    if source == "model" and section.cache is not None:
        raise ConfigError(f"{where}: reference.cache: algorithm.reference 'model' reads a model (reference.path or "
                          "reference.tiny); a cache file is algorithm.reference 'cache'")
    if source == "cache" and section.cache is None:
        raise ConfigError(f"{where}: reference: algorithm.reference 'cache' needs reference.cache (a distillzoo "
                          "reference-cache file)")


def sequence_logps(models, model, batch) -> SequenceLogps:
    """Summed response log-probs ``[2B]`` of a preference batch through the fused token log-prob path."""
    hidden = models.hidden(model, batch.input_ids, batch.attention_mask)
    weight = models.head(model)
    targets = batch.labels[:, 1:]
    per_token = token_logprobs(hidden, weight, targets)
    return SequenceLogps(per_token.sum(-1), (targets != IGNORE_INDEX).sum(-1), hidden, targets, weight)


# ---------------------------------------------------------------------------- dpkd
class DPKDAlgorithm(PreferenceOptimisation):
    name = "dpkd"
    summary = ("Direct Preference Knowledge Distillation: the teacher is the reference and y_w its answer, y_l the "
               "student's own (a pairs file, or sampled online, seeded by step and sample id)")
    paper = {"title": "Direct Preference Knowledge Distillation for Large Language Models",
             "authors": "Li, Gu, Dong, Wang, Cheng, Wei", "year": 2024, "url": "https://arxiv.org/abs/2406.19774"}
    params = {
        "online": {"type": "bool", "default": False,
                   "doc": "false: preference records whose chosen is the teacher's answer and rejected the student's "
                          "(distillzoo generate, mode pairs); true: instruction records whose reply is the teacher's "
                          "answer, and y_l sampled from the current student at each step"},
        "max_new_tokens": {"type": "int", "default": 64, "range": "[1, inf)",
                           "doc": "with online: the longest student sample"},
        "temperature": {"type": "float", "default": 1.0, "range": "[0, inf)",
                        "doc": "with online: the student's sampling temperature (0: greedy)"},
    }
    eval_records = "instruction"  # held-out student NLL and KL(teacher || student) on instruction records
    eval_batches = Algorithm.eval_batches
    eval_loss = Algorithm.eval_loss

    def __init__(self, objective, **params):
        super().__init__(objective, **params)
        self.records = "instruction" if self.online else "preference"

    def check(self, cfg, where):
        if not self.objective.needs_reference:
            raise ConfigError(f"{where}: objective.name: algorithm 'dpkd' uses the teacher as the reference, but "
                              f"{self.objective.name!r} is reference-free; use dpkd or dpo")
        require_model(cfg, "teacher", "algorithm 'dpkd' (the teacher is the reference and the author of y_w)", where)
        section = cfg.reference
        if section is not None and (model_given(section) or section.cache is not None):
            raise ConfigError(f"{where}: reference: algorithm 'dpkd' takes the teacher as the reference; remove the "
                              "reference section (or use algorithm 'preference' for another reference)")
        self.source = "teacher"

    def micro_batches(self, run, examples, step, size):
        if self.online:
            examples = self.online_pairs(run, examples, step)
        return super().micro_batches(run, examples, step, size)

    def online_pairs(self, run, examples: list[dict], step: int) -> list[PreferenceExample]:
        """Pairs of the records' replies (y_w) and the current student's samples (y_l) for the same prompts."""
        sampling = step_sampling(self.max_new_tokens, self.temperature, run.seed, step)
        samples = run.call(lambda models: student_samples(models.student, run.tokenizer, examples, sampling))
        pairs = []
        for i, (ex, sample) in enumerate(zip(examples, samples)):
            prompt, chosen = split_last_reply(ex)
            _, rejected = split_last_reply(sample)
            pairs.append(PreferenceExample(str(ex.get("id", i)), as_token_ids(prompt), as_token_ids(chosen),
                                           as_token_ids(rejected)))
        return pairs


@hookimpl
def register_algorithms(register):
    register(LogitDistillation)
    register(PreferenceOptimisation)
    register(DPKDAlgorithm)
