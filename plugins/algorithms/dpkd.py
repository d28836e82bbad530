"""``dpkd``: Direct Preference Knowledge Distillation (Li, Gu, Dong et al. 2024).

The teacher is the reference and the author of y_w; y_l is the student's own
response, read from a pairs file (``distillzoo generate`` mode ``pairs``) or, with
``online: true``, sampled by the current student at each step, seeded by the seed,
the step and the sample id, against the records' replies (the teacher's answers) as
y_w. Its held-out evaluation is the student's NLL and KL(teacher || student) per
response token on instruction records.

With ``teacher: {server: URL, model: NAME}`` the teacher's log-probs of y_w and y_l come
from the server (``prompt_logprobs`` of each sequence's own tokens, summed over the
response), and the held-out evaluation is the student's NLL alone.
"""

from __future__ import annotations

import dataclasses

from distillzoo.data.records import as_token_ids
from distillzoo.data.pairs import PreferenceExample
from distillzoo.errors import ConfigError
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.models.causal_lm import model_given, require_model
from distillzoo.models.generation import split_last_reply, step_sampling, student_samples
from distillzoo.plugins.algorithms.preference import Preference
from distillzoo.training.algorithm import Algorithm


class DPKD(Preference):
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
    #: the teacher may be served: its log-probs of y_w and y_l come from the server's prompt_logprobs
    served_roles = ("teacher",)
    served = None

    def __init__(self, objective, **params):
        super().__init__(objective, **params)
        self.records = "instruction" if self.online else "preference"

    def check(self, spec, where):
        if not self.objective.needs_reference:
            raise ConfigError(f"{where}: objective.name: algorithm 'dpkd' uses the teacher as the reference, but "
                              f"{self.objective.name!r} is reference-free; use dpkd or dpo")
        teacher = spec.teacher
        if teacher is not None and teacher.server is not None:
            self.served = _served_reference(spec, self.objective, where)
        else:
            require_model(spec, "teacher", "algorithm 'dpkd' (the teacher is the reference and the author of y_w)",
                          where)
        section = spec.reference
        if section is not None and (model_given(section) or section.cache is not None):
            raise ConfigError(f"{where}: reference: algorithm 'dpkd' takes the teacher as the reference; remove the "
                              "reference section (or use algorithm 'preference' for another reference)")
        self.source = "served" if self.served is not None else "teacher"

    def reads(self, spec):
        return {"teacher"}  # a model, or a server

    def prepare(self, run):
        if self.served is not None:
            from distillzoo.teacher.served import check_served

            check_served(self.served, run.tokenizer, f"{run.where}: teacher.server")

    def micro_batches(self, run, examples, step, size):
        if self.online:
            examples = self.online_pairs(run, examples, step)
        if self.served is not None:
            examples = self.served_reference(examples)
        return super().micro_batches(run, examples, step, size)

    def served_reference(self, examples: list[PreferenceExample]) -> list[PreferenceExample]:
        """The pairs with the server's log-probs of y_w and y_l (summed over each response's tokens, given the
        prompt), read from ``prompt_logprobs`` of the sequences' own tokens, as the batch's reference."""
        sequences, starts, ids = [], [], []
        for ex in examples:
            for response in (ex.chosen, ex.rejected):
                sequences.append(ex.prompt.tolist() + response.tolist())
                starts.append(len(ex.prompt))
                ids.append(ex.id)
        rows = self.served.token_logprobs(sequences, ids, starts)
        sums = [float(row[start - 1:].double().sum()) for row, start in zip(rows, starts)]
        return [dataclasses.replace(ex, reference_chosen_logps=sums[2 * i], reference_rejected_logps=sums[2 * i + 1])
                for i, ex in enumerate(examples)]

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


def _served_reference(spec, objective, where: str):
    """The teacher server's client, refused where the objective needs more than its log-probs of the responses."""
    from distillzoo.teacher.served import ServedTeacher

    if getattr(objective, "rkl_weight", 0):
        raise ConfigError(f"{where}: objective.rkl_weight: the reverse-KL term needs the teacher's logits along y_w; "
                          "a served teacher gives its log-probs of the responses only: use teacher.path, or rkl_weight 0")
    teacher = spec.teacher
    return ServedTeacher(teacher.server, teacher.model, top_k=1, api=teacher.api)


@hookimpl
def register_algorithms(register):
    register(DPKD)
