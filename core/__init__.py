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

from .config import build_objective, load_config, starter_config
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
from .base import LogitObjective, Mixture, Objective, PointwiseDivergence, SparseTeacher
from .algorithm import Algorithm, MicroBatch, Models, Run, StepLoss
from .callbacks import Callback
from .causal_lm import SequenceLogps, sequence_logps
from .data import PreferenceBatch, PreferenceDataset, collate_preference
from .preference import PreferenceObjective, PreferenceStep, preference_step
from .reference_cache import ReferenceCache, write_reference_cache
from .scoring import ScoreBatch, Scorer
from .tokenizer import load_tokenizer

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
