"""``preference``: preference optimisation on chosen/rejected pairs (dpo and its loss types, simpo, any
``PreferenceObjective``).

The reference log-probs come from a live model (the teacher, or a ``reference:``
model), a frozen copy of the student's starting weights (TRL's default), the
records' ``reference_*_logps`` columns, or a reference cache (``algorithm.reference``).
Each micro-batch's loss is summed over its pairs and the loop divides by the step's
global count; policy log-probs go through the fused sequence log-prob path (no
``[2B, T, V]`` tensor).
"""

from __future__ import annotations

import copy

import torch

from distillzoo.data.pairs import collate_preference
from distillzoo.data.records import IGNORE_INDEX
from distillzoo.errors import ConfigError, DataError, DistillzooError
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.models.causal_lm import model_given, require_model
from distillzoo.objectives.preference import preference_loss
from distillzoo.training.algorithm import Algorithm, MicroBatch, StepLoss


REFERENCES = ("auto", "initial", "teacher", "model", "cache", "data")


class Preference(Algorithm):
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

    def check(self, spec, where):
        section = spec.reference
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
            require_model(spec, "teacher", f"algorithm.reference 'teacher' (algorithm {self.name!r})", where)
        if source == "cache":
            from distillzoo.teacher.reference_cache import ReferenceCache

            try:
                self.reference_cache = ReferenceCache(section.cache)
            except DistillzooError as e:
                raise ConfigError(f"{where}: reference.cache: {e}") from None
        self.source = source

    def roles(self, spec):
        return {"reference": True} if self.source == "model" else {"teacher": True} if self.source == "teacher" else {}

    def reads(self, spec):
        return set(self.roles(spec)) | ({"reference"} if self.source == "cache" else set())

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
        policy = models.sequence_logps(models.student, b)
        ref_model, reference = self._reference_model(models), None
        if ref_model is not None:
            with torch.no_grad():
                reference = models.sequence_logps(ref_model, b)
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
    kinds = [k for k in ("path", "tiny", "cache") if getattr(section, k) is not None]
    if len(kinds) != 1:
        raise ConfigError(f"{where}: reference: give exactly one of reference.path, reference.tiny or reference.cache "
                          f"(got {kinds})")
    if source == "model" and section.cache is not None:
        raise ConfigError(f"{where}: reference.cache: algorithm.reference 'model' reads a model (reference.path or "
                          "reference.tiny); a cache file is algorithm.reference 'cache'")
    if source == "cache" and section.cache is None:
        raise ConfigError(f"{where}: reference: algorithm.reference 'cache' needs reference.cache (a distillzoo "
                          "reference-cache file)")


@hookimpl
def register_algorithms(register):
    register(Preference)
