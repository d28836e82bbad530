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

from .config import build_objective, load_config
from .errors import (
    ConfigError,
    DataError,
    DistillzooError,
    NonFiniteError,
    ParameterError,
    PluginError,
    PluginWarning,
    UnknownNameError,
)
from .hookspecs import hookimpl
from .manager import (
    DEFAULT_PLUGINS,
    algorithm_spec,
    algorithm_specs,
    components,
    get_plugin_manager,
    list_objectives,
    objective,
    objective_spec,
    objective_specs,
    plugins_info,
)
# The rest needs torch (seconds to import): loaded on first use, so `distillzoo --help` stays fast.
_LAZY = {
    "base": ("LogitObjective", "Mixture", "Objective", "PointwiseDivergence", "SparseTeacher"),
    "algorithm": ("Algorithm", "MicroBatch", "Models", "Run", "StepLoss"),
    "callbacks": ("Callback",),
    "causal_lm": ("SequenceLogps", "sequence_logps"),
    "data": ("PreferenceBatch", "PreferenceDataset", "collate_preference"),
    "preference": ("PreferenceObjective", "PreferenceStep", "preference_step"),
    "reference_cache": ("ReferenceCache", "write_reference_cache"),
    "scoring": ("ScoreBatch", "Scorer"),
    "starter": ("starter_config",),
    "tokenizer": ("load_tokenizer",),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    """``dz.LogitObjective`` and the other torch-backed names, and submodules (``dz.trainer``), on first use."""
    import importlib

    if name in _HOME:
        value = getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
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
    "Callback",
    "MicroBatch",
    "Models",
    "Run",
    "StepLoss",
    "algorithm_spec",
    "algorithm_specs",
    "ScoreBatch",
    "Scorer",
    "ConfigError",
    "DataError",
    "DEFAULT_PLUGINS",
    "DistillzooError",
    "LogitObjective",
    "NonFiniteError",
    "Mixture",
    "Objective",
    "ParameterError",
    "PluginError",
    "PluginWarning",
    "PointwiseDivergence",
    "PreferenceBatch",
    "PreferenceDataset",
    "PreferenceObjective",
    "PreferenceStep",
    "ReferenceCache",
    "SequenceLogps",
    "SparseTeacher",
    "UnknownNameError",
    "build_objective",
    "collate_preference",
    "components",
    "get_plugin_manager",
    "hookimpl",
    "list_objectives",
    "load_config",
    "load_tokenizer",
    "objective",
    "objective_spec",
    "objective_specs",
    "plugins_info",
    "preference_step",
    "sequence_logps",
    "starter_config",
    "write_reference_cache",
]
