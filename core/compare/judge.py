"""The judge of a comparison: a trained student's held-out metrics against the run's teacher, prompt by prompt.

It reads the split as the run's own ``data.eval`` reads it (the run's tokenizer,
system message and ``max_length``), so the held-out NLL it reports is the run's
final ``eval/nll``, and scores every prompt with
:func:`distillzoo.teacher.evaluation.evaluate` (ROUGE-L, exact match, NLL, top-1
agreement, KL both ways, TVD, length), keeping each prompt's score for the paired
statistics of the report.
"""

from __future__ import annotations

from pathlib import Path

from distillzoo.teacher.evaluation import GROUPS, Decoding


class Judge:
    """The held-out (and validation) metrics of a trained student, against the run's teacher."""

    def __init__(self, cfg, decoding: Decoding | None = None, teacher: dict | None = None) -> None:
        """``teacher``: the teacher model's section when the run's teacher is a server (``serve_teacher``)."""
        from distillzoo.config import ModelConfig
        from distillzoo.data.tokenizer import load_tokenizer
        from distillzoo.models.causal_lm import model_from_config

        self.tokenizer = load_tokenizer(cfg.data.tokenizer)  # as the run tokenizes
        self.system, self.max_length = cfg.data.system, cfg.data.max_length
        section = cfg.teacher if teacher is None else ModelConfig(**teacher)
        self.teacher = model_from_config(section, "teacher").eval()
        self.decoding = decoding or Decoding()

    def __call__(self, student_dir: Path, split: dict) -> dict:
        """``{metric: mean, "<metric>/<group>=<value>": mean per task and language, "prompts": per-prompt
        scores}`` of the student in ``student_dir`` on ``split`` ({path, format, columns?})."""
        from distillzoo.models.causal_lm import load_causal_lm
        from distillzoo.teacher.evaluation import evaluate, read_split

        prompts = read_split(split["path"], split["format"], self.tokenizer, system=self.system,
                             max_length=self.max_length, columns=split.get("columns"))
        scores = evaluate(load_causal_lm(str(student_dir)), self.tokenizer, prompts, teacher=self.teacher,
                          decoding=self.decoding, system=self.system)
        summary = scores.summary()
        result = {m: summary[m] for m in scores.sums}
        for group in GROUPS:
            for value, part in summary.get(f"by_{group}", {}).items():
                result.update({f"{m}/{group}={value}": part[m] for m in scores.sums})
        result["prompts"] = scores.to_json()
        return result
