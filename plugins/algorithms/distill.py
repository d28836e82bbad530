"""``distill``: logit-level distillation, off- and on-policy.

The objective (fkl, jsd, a mixture, ...) on the next-token distributions of teacher
and student along the data's replies, from a live teacher, a top-k teacher cache, or a teacher server's top-k
(``teacher: {server: URL, model: NAME, top_k: K}``, :mod:`distillzoo.teacher.served`).
With ``on_policy`` (GKD's λ, Agarwal et al. 2024) a step replaces each example's
last reply with the student's own sample and trains on that, teacher included::

    algorithm: {name: distill, on_policy: 0.5, max_new_tokens: 64, temperature: 1.0}

Which steps sample depends only on the seed and the step number, so every rank
agrees and a resumed run repeats the choice; each sample is seeded by the seed,
the step and its sample id. Each micro-batch's loss is summed over its tokens and
the loop divides by the step's global count.
"""

from __future__ import annotations

import torch

from distillzoo.data.records import IGNORE_INDEX
from distillzoo.data.tokenizer import load_tokenizer
from distillzoo.errors import ConfigError, DataError, DistillzooError, NonFiniteError, ServerError
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.models.causal_lm import lm_head_weight, model_vocab
from distillzoo.models.generation import (decode, sample_seed, split_last_reply, step_sampling,
                                          student_samples, with_replies)
from distillzoo.objectives.mixture import Mixture
from distillzoo.training.algorithm import Algorithm, StepLoss, instruction_batches


def on_policy_step(seed: int, step: int, probability: float) -> bool:
    """Whether step ``step`` trains on student samples: the same on every rank, and after a resume."""
    return torch.rand((), generator=torch.Generator().manual_seed(sample_seed(seed, f"on-policy:{step}"))) < probability


class Distill(Algorithm):
    name = "distill"
    summary = ("logit-level KD: the objective on teacher and student next-token distributions along the data's "
               "replies (live teacher or top-k cache); on_policy mixes in the student's own samples (GKD)")
    paper = {"title": "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
             "authors": "Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist, Bachem", "year": 2024,
             "url": "https://arxiv.org/abs/2306.13649"}
    params = {
        "on_policy": {"type": "float", "default": 0.0, "range": "[0, 1]",
                      "doc": "GKD's lambda: the probability per step that the student samples the replies it is "
                             "trained on (0: off-policy, the data's replies only)"},
        "max_new_tokens": {"type": "int", "default": 64, "range": "[1, inf)",
                           "doc": "with on_policy: the longest student sample"},
        "temperature": {"type": "float", "default": 1.0, "range": "[0, inf)",
                        "doc": "with on_policy: the sampling temperature (0: greedy)"},
        "sampler": {"type": "str", "default": "student", "choices": ["student", "teacher"],
                    "doc": "with on_policy: who writes the sampled replies: the student (GKD), or the teacher "
                           "(sequence-level KD on the fly: a teacher model, or teacher.server's generation)"},
    }
    objective_kinds = ("logit",)
    records = "instruction"
    #: the roles it can read from a teacher server
    served_roles = ("teacher",)
    #: it takes ``teachers:``, several served or cached teachers (:mod:`distillzoo.plugins.algorithms.teachers`)
    multi_teacher = True
    cache = None
    served = None
    teachers = None
    fields = None  # {(stream, sample id): {field: value}}: what teachers routed by record field read

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: dict = {}  # step -> (sequences, future of the server's top-k), fetched ahead

    def reads(self, spec):
        return {"teacher"}  # a model or a cache; a teacher named for a ce run reports eval/kl_teacher_student

    def _cache_given(self, spec) -> bool:
        return spec.teacher is not None and spec.teacher.cache is not None

    def roles(self, spec):
        if self._cache_given(spec) or (spec.teacher is not None and spec.teacher.server is not None) or \
                spec.config.get("teachers") is not None:
            return {}
        needed = bool(self.objective.needs_teacher) or self.sampler == "teacher"
        # a teacher named for a ce run is loaded only to report eval/kl_teacher_student
        return {"teacher": needed} if needed or (spec.data is not None and spec.data.eval is not None) else {}

    def check(self, spec, where):
        if self.sampler == "teacher" and (spec.config.get("teachers") is not None or self._cache_given(spec)
                                          or spec.teacher is None):
            raise ConfigError(f"{where}: algorithm.sampler: 'teacher' samples from one teacher that can generate: "
                              "teacher.path, teacher.tiny or teacher.server (not a cache, not teachers:)")
        if spec.config.get("teachers") is not None:
            from distillzoo.plugins.algorithms.teachers import parse_teachers

            self.teachers = parse_teachers(spec.config.teachers, spec, lambda one, at: (
                _served_teacher if one.teacher.server is not None else _open_teacher_cache)(one, self.objective, at),
                where)
            if any(t.route for t in self.teachers):
                from distillzoo.plugins.algorithms.teachers import record_fields

                self.fields = record_fields(self.teachers, spec.data.streams, where)
            if self.on_policy and not all(t.served for t in self.teachers):
                raise ConfigError(f"{where}: algorithm.on_policy: a teacher cache covers the data's responses only; "
                                  "the student's own samples need served teachers")
            return
        if self.on_policy and self._cache_given(spec):
            raise ConfigError(f"{where}: algorithm.on_policy: a teacher cache covers the data's responses only; the "
                              "student's own samples need a live teacher (teacher.path or teacher.tiny)")
        teacher = spec.teacher
        sources = [] if teacher is None else [key for key in ("path", "tiny", "cache", "server")
                                              if getattr(teacher, key) is not None]
        if (self.objective.needs_teacher or "server" in sources) and len(sources) != 1:
            raise ConfigError(f"{where}: teacher: the objective needs a teacher; give one of teacher.path, teacher.tiny, "
                              f"teacher.cache or teacher.server{f' (got {sources})' if sources else ''}")
        if "server" in sources:
            self.served = _served_teacher(spec, self.objective, where)
        if self._cache_given(spec):
            self.cache = _open_teacher_cache(spec, self.objective, where)
            vocab = model_vocab(spec.student)  # from its config: checked again on the built head in prepare
            if vocab is not None:
                self.cache.check(f"{where}: teacher.cache", vocab_size=vocab)

    def prepare(self, run):
        from distillzoo.teacher.served import check_served

        for t in self.teachers or ():
            if t.served:
                check_served(t.source, run.tokenizer, f"{run.where}: teachers ({t.name})")
            else:
                t.source.check(f"{run.where}: teachers ({t.name})", vocab_size=lm_head_weight(run.student).shape[0])
        if self.served is not None:
            check_served(self.served, run.tokenizer, f"{run.where}: teacher.server")
        if self.cache is not None:
            self.cache.check(f"{run.where}: teacher.cache", vocab_size=lm_head_weight(run.student).shape[0])

    def micro_batches(self, run, examples, step, size):
        sampled = bool(self.on_policy) and on_policy_step(run.seed, step, self.on_policy)
        if sampled:
            sampling = step_sampling(self.max_new_tokens, self.temperature, run.seed, step)
            examples = self._samples(run, examples, sampling)
        batches = instruction_batches(examples, size, run.tokenizer.pad_id, run.device)
        if self.cache is not None:
            from distillzoo.teacher.cache import token_fingerprint

            for start, b in zip(range(0, len(examples), size), batches):
                fingerprints = [token_fingerprint(ex) for ex in examples[start:start + size]]
                b.inputs["sparse"] = self.cache.sparse_teacher(_sample_ids(b.inputs["ids"], run.where),
                                                               b.inputs["targets"], fingerprints)
        if self.teachers is not None:
            for start, b in zip(range(0, len(examples), size), batches):
                b.inputs["routes"] = self._routes(examples[start:start + size], b.inputs)
        if self.served is not None:
            rows = self._served_rows(run, examples, step)
            for start, b in zip(range(0, len(examples), size), batches):
                b.inputs["sparse"] = self.served.sparse_teacher(b.inputs["input_ids"], b.inputs["attention_mask"],
                                                                b.inputs["targets"], b.inputs["ids"],
                                                                rows[start:start + size])
        return batches

    def _samples(self, run, examples, sampling):
        """The examples with their last reply sampled by the student, or by the teacher (``sampler: teacher``: the
        served teacher's generation, seeded per sample as the server's ``seed``, or the teacher model's)."""
        if self.sampler == "student":
            return run.call(lambda models: student_samples(models.student, run.tokenizer, examples, sampling))
        prompts = [split_last_reply(ex)[0] for ex in examples]
        ids = [str(ex.get("id", i)) for i, ex in enumerate(examples)]
        if self.served is not None:
            answers = self.served.generate(prompts, sampling, ids, [run.tokenizer.im_end_id])
        else:
            answers = run.call(lambda models: decode(models.teacher, run.tokenizer, prompts, sampling, ids=ids,
                                                     batch_size=len(prompts)))
        return with_replies(examples, prompts, answers, run.tokenizer)

    def _served_rows(self, run, examples, step):
        """The server's top-k of this step's sequences, fetched ahead when ``teacher.prefetch`` > 0: before the
        wait for this step, the next steps' off-policy examples (read with ``run.peek``, the data order untouched)
        are queued behind it, so the server scores step t+1 while the student computes step t."""
        sequences = [ex["input_ids"].tolist() for ex in examples]
        pending = self.pending.pop(step, None)
        for old in [s for s in self.pending if s < step]:
            self.pending.pop(old)
        prefetched = pending is not None and pending[0] == sequences
        if not prefetched:  # not fetched ahead (the first step, a resume, a sample)
            pending = (sequences, self._submit(examples, sequences))
        depth = int(run.spec.teacher.prefetch or 0) if run.peek is not None else 0
        for ahead in range(1, depth + 1):
            later = step + ahead
            if later >= run.spec.train.steps or later in self.pending or \
                    (self.on_policy and on_policy_step(run.seed, later, self.on_policy)):
                continue  # a step the student samples for is scored when its samples exist
            upcoming = run.peek(ahead)
            later_sequences = [ex["input_ids"].tolist() for ex in upcoming]
            self.pending[later] = (later_sequences, self._submit(upcoming, later_sequences))
        try:
            return pending[1].result()
        except ServerError:
            if not prefetched:
                raise
            return self._submit(examples, sequences).result()  # fetched ahead while the server was away: once more

    def close(self):
        for client in [self.served] + [t.source for t in self.teachers or () if t.served]:
            if client is not None:
                client.close()

    def _routes(self, examples, x):
        """Per teacher that scores rows of this micro-batch: ``(name, rows, its top-k of those rows, weight)``."""
        from distillzoo.plugins.algorithms.teachers import routes
        from distillzoo.teacher.cache import token_fingerprint

        out = []
        for teacher, rows, weight in routes(self.teachers, examples, self.fields):
            index = torch.tensor(rows, device=x["targets"].device)
            ids = [x["ids"][i] for i in rows]
            if teacher.served:
                sparse = teacher.source.sparse_teacher(x["input_ids"][index], x["attention_mask"][index],
                                                       x["targets"][index], ids)
            else:
                sparse = teacher.source.sparse_teacher(ids, x["targets"][index],
                                                       [token_fingerprint(examples[i]) for i in rows])
            out.append((teacher.name, index, sparse, weight))
        return out

    def _submit(self, examples, sequences):
        """Ask the server for the examples' top-k from each one's first reply token on (the loss reads no other)."""
        starts = [int(ex["loss_mask"].nonzero()[0]) if bool(ex["loss_mask"].any()) else len(seq)
                  for ex, seq in zip(examples, sequences)]
        return self.served.submit(sequences, [str(ex.get("id")) for ex in examples], starts)

    def loss(self, models, batch):
        x = batch.inputs
        hs = models.hidden(models.student, x["input_ids"], x["attention_mask"])
        ws = models.head(models.student)
        if "routes" in x:
            return self._routed_loss(hs, ws, x)
        teacher, wt = x.get("sparse"), None
        if teacher is None and self.objective.needs_teacher:
            with torch.no_grad():
                teacher = models.hidden(models.teacher, x["input_ids"], x["attention_mask"])
                wt = models.head(models.teacher)
        try:
            value = self.objective.from_hidden(hs, ws, teacher, wt, x["targets"])
        except NonFiniteError as e:  # name the sample the row belongs to, and where the teacher came from
            source = f"the teacher cache {self.cache.path}" if self.cache is not None else \
                f"the teacher server {self.served.url}" if self.served is not None else "the teacher model"
            raise NonFiniteError(f"{source}, {_row_of(e.row, x)}: {e}", e.row) from None
        # a mixture's per-term losses are means over the micro-batch's tokens; the loop wants sums
        terms = getattr(self.objective, "term_losses", {})
        return StepLoss(value, {f"loss/{name}": v * batch.count for name, v in terms.items()})

    def _routed_loss(self, hs, ws, x):
        """The objective against each teacher on the rows it scores, weighted; ``teachers/<name>``: its tokens."""
        # every teacher's key on every rank, 0 where it scored nothing: the loop all-reduces the keys in order
        value, metrics = hs.new_zeros(()), {f"teachers/{t.name}": hs.new_zeros((), dtype=torch.float64)
                                            for t in self.teachers}
        for term in getattr(self.objective, "term_names", ()):  # a mixture's terms
            metrics[f"loss/{term}"] = hs.new_zeros(())
        for name, rows, sparse, weight in x["routes"]:
            targets = x["targets"][rows]
            value = value + weight * self.objective.from_hidden(hs[rows], ws, sparse, None, targets)
            count = (targets != IGNORE_INDEX).sum().double()
            metrics[f"teachers/{name}"] = count
            for term, v in getattr(self.objective, "term_losses", {}).items():
                metrics[f"loss/{term}"] = metrics[f"loss/{term}"] + weight * v * count
        return StepLoss(value, metrics)


def _row_of(row: int | None, inputs: dict) -> str:
    """'sample ID, scored token N' for a row of the flattened ``[B, T-1]`` targets of a micro-batch."""
    if row is None:
        return "a batch"
    targets = inputs["targets"]
    b, t = divmod(row, targets.shape[1])
    n = int((targets[b, :t] != IGNORE_INDEX).sum())
    return f"sample {inputs['ids'][b]!r}, scored token {n} (position {t + 1})"


def _open_teacher_cache(spec, objective, where: str):
    """The teacher cache, refused unless its manifest agrees with the config (k, tokenizer, temperature)."""
    from distillzoo.teacher.cache import TeacherCache

    try:
        cache = TeacherCache(spec.teacher.cache)
    except DistillzooError as e:
        raise ConfigError(f"{where}: teacher.cache: {e}") from None
    terms = objective.terms if isinstance(objective, Mixture) else [objective]
    dense_only = [t.name for t in terms if t.needs_teacher and not t.accepts_sparse_teacher]
    if dense_only:
        raise ConfigError(f"{where}: teacher.cache: {', '.join(dense_only)} cannot take a top-k (sparse) teacher; a "
                          "cache works with the objectives that accept one (fkl, rkl, jsd, skl, srkl, tvd)")
    temperatures = {float(t.temperature) for t in terms if getattr(t, "needs_teacher", False)}
    if len(temperatures) > 1:
        raise ConfigError(f"{where}: objectives: a teacher cache holds one temperature; the terms use "
                          f"{sorted(temperatures)}")
    tokenizer = load_tokenizer(spec.data.tokenizer if spec.data is not None else None).name
    cache.check(f"{where}: teacher.cache", k=spec.teacher.top_k, tokenizer=tokenizer,
                temperature=temperatures.pop() if temperatures else None)
    return cache


def _served_teacher(spec, objective, where: str):
    """The teacher server's client, refused unless the objective can read its raw top-k log-probs."""
    from distillzoo.teacher.served import APIS, ServedTeacher

    teacher = spec.teacher
    terms = objective.terms if isinstance(objective, Mixture) else [objective]
    dense_only = [t.name for t in terms if t.needs_teacher and not t.accepts_sparse_teacher]
    if dense_only:
        raise ConfigError(f"{where}: teacher.server: {', '.join(dense_only)} cannot take a top-k (sparse) teacher; a "
                          "served teacher works with the objectives that accept one (fkl, rkl, jsd, skl, srkl, tvd)")
    hot = sorted({float(t.temperature) for t in terms if t.needs_teacher and float(t.temperature) != 1.0})
    if hot:
        raise ConfigError(f"{where}: objective temperature {hot[0]}: a server's prompt_logprobs are of the raw logits "
                          "(temperature 1), and a top-k cannot be re-tempered without the whole vocabulary; use "
                          "temperature 1 with teacher.server, or a teacher model or cache")
    if teacher.top_k is None or teacher.top_k < 1:
        raise ConfigError(f"{where}: teacher.top_k: give the log-probs per token to ask of teacher.server (an integer "
                          f">= 1, at most the server's --max-logprobs), got {teacher.top_k!r}")
    if not isinstance(teacher.prefetch, int) or teacher.prefetch < 0:
        raise ConfigError(f"{where}: teacher.prefetch: the steps fetched ahead must be an integer >= 0, got "
                          f"{teacher.prefetch!r}")
    if teacher.api not in APIS:
        raise ConfigError(f"{where}: teacher.api: {teacher.api!r} is not one of {list(APIS)}")
    return ServedTeacher(teacher.server, teacher.model, top_k=teacher.top_k, api=teacher.api)


def _sample_ids(ids: list, where: str) -> list:
    if any(i is None for i in ids):
        raise DataError(f"{where}: teacher.cache: an example has no sample id (a data directory from an older "
                        "distillzoo prepare? prepare it again); the cache is read by id")
    return ids


@hookimpl
def register_algorithms(register):
    register(Distill)
