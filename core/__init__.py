"""distillzoo: a plugin-based loss and algorithm zoo for distilling LLMs into small Qwen students.

    import distillzoo as dz
    dz.list_objectives()
    loss_fn = dz.objective("fkl", temperature=2.0)
    loss = loss_fn(student_logits, teacher_logits, labels)
    loss = loss_fn.from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    dpo = dz.objective("dpo", beta=0.1)
    loss = dpo(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)

Training algorithms (``dz.Algorithm``: distill, preference, dpkd, plugins') and
trainer callbacks (``dz.Callback``) are plugins too; ``distillzoo train`` runs them all.
"""

from distillzoo.config import build_objective, load_config
from distillzoo.errors import (
    ConfigError,
    DataError,
    DistillzooError,
    NonFiniteError,
    ParameterError,
    PluginError,
    PluginWarning,
    UnknownNameError,
)
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.hooks.manager import DEFAULT_PLUGINS, algorithm_spec, algorithm_specs, components, get_plugin_manager
from distillzoo.listing import plugins_info
from distillzoo.objectives.registry import list_objectives, objective, objective_spec, objective_specs

# The rest needs torch (seconds to import): loaded on first use, so `distillzoo --help` stays fast.
_LAZY = {
    "distillzoo.objectives.logit": ("LogitObjective", "Objective", "PointwiseDivergence"),
    "distillzoo.objectives.mixture": ("Mixture",),
    "distillzoo.objectives.sparse": ("SparseTeacher",),
    "distillzoo.objectives.preference": ("PreferenceObjective", "PreferenceStep", "preference_step"),
    "distillzoo.training.algorithm": ("Algorithm", "MicroBatch", "Models", "Run", "StepLoss", "instruction_batches"),
    "distillzoo.training.callbacks": ("Callback",),
    "distillzoo.training.loop": ("TrainResult", "train"),
    "distillzoo.models.causal_lm": ("SequenceLogps", "require_model", "sequence_logps"),
    "distillzoo.models.generation": ("Sampling", "student_samples"),
    "distillzoo.data.records": ("IGNORE_INDEX",),
    "distillzoo.data.pairs": ("PreferenceBatch", "PreferenceDataset", "collate_preference"),
    "distillzoo.teacher.reference_cache": ("ReferenceCache", "write_reference_cache"),
    "distillzoo.teacher.scoring": ("ScoreBatch", "Scorer"),
    "distillzoo.starter": ("starter_config",),
    "distillzoo.data.tokenizer": ("load_tokenizer",),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    """``dz.LogitObjective`` and the other torch-backed names, and subpackages (``dz.training``), on first use."""
    import importlib

    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "algorithm_spec",
    "algorithm_specs",
    "build_objective",
    "Callback",
    "collate_preference",
    "components",
    "ConfigError",
    "DataError",
    "DEFAULT_PLUGINS",
    "DistillzooError",
    "get_plugin_manager",
    "hookimpl",
    "IGNORE_INDEX",
    "instruction_batches",
    "list_objectives",
    "load_config",
    "load_tokenizer",
    "LogitObjective",
    "MicroBatch",
    "Mixture",
    "Models",
    "NonFiniteError",
    "objective",
    "Objective",
    "objective_spec",
    "objective_specs",
    "ParameterError",
    "PluginError",
    "plugins_info",
    "PluginWarning",
    "PointwiseDivergence",
    "preference_step",
    "PreferenceBatch",
    "PreferenceDataset",
    "PreferenceObjective",
    "PreferenceStep",
    "ReferenceCache",
    "require_model",
    "Run",
    "Sampling",
    "ScoreBatch",
    "Scorer",
    "sequence_logps",
    "SequenceLogps",
    "SparseTeacher",
    "starter_config",
    "StepLoss",
    "student_samples",
    "train",
    "TrainResult",
    "UnknownNameError",
    "write_reference_cache",
]
