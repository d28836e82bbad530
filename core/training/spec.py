"""The run spec: a loaded config resolved once, at the edge, into what ``distillzoo train`` runs.

:func:`resolve` checks everything that can be checked before a model loads and
returns a :class:`RunSpec`, whose typed fields the loop and the algorithms read
(they never re-check the config):

* the objective (every term summed over its units) and the training algorithm,
  built with its own parameters and its own :meth:`~distillzoo.Algorithm.check`;
* the models: one student (a path, or ``tiny`` arguments checked against the tiny
  model's), what the algorithm needs besides it, no section that nothing reads, vocab
  sizes against the tokenizer, LoRA settings whose target modules the student has
  (read from its config on the meta device, no weights);
* the data: each stream's kind and format, the records the algorithm reads, the
  mixing rules, and every record the run will read, tokenized (encoding, fields,
  Parquet pages), so a bad row is refused naming its file and line or row;
* the numbers the schema types but cannot bound (a negative ``train.lr``, a seed
  numpy refuses, a batch the ranks cannot split), the choices of precision,
  parallelism and resume, the callbacks by name and params, and an ``output_dir``
  that can be written, has room for the run, and holds no other run that
  ``resume: auto`` would refuse to continue.

``distillzoo check`` runs the same function (building no callback), so what it
passes, ``train`` does not refuse later before its models load.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillzoo.config import DataConfig, ModelConfig, StreamConfig, TrainConfig, algorithm_choice, build_objective
from distillzoo.config import objective_terms
from distillzoo.data.records import format_records, formats_of
from distillzoo.data.tables import kind as table_kind
from distillzoo.data.tokenizer import ChatTokenizer, load_tokenizer
from distillzoo.errors import ConfigError, DistillzooError
from distillzoo.hooks.manager import algorithm_spec
from distillzoo.models.causal_lm import check_vocab, meta_model, model_given, parameter_count, require_model
from distillzoo.models.causal_lm import ties_head, tiny_kwargs
from distillzoo.training import lora
from distillzoo.training.algorithm import ROLES
from distillzoo.training.callbacks import build_callbacks
from distillzoo.training.run_dir import RunDir, check_space, check_writable

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
RESUME = ("auto", "never")


@dataclass(frozen=True)
class StreamSpec:
    """One data stream as the run reads it: where its records are, what they hold, how it mixes."""

    name: str
    path: Path
    kind: str  #: jsonl, json, parquet, arrow, datasets (records) or prepared (token shards)
    format: str | None
    columns: dict | None
    records: str  #: instruction or preference
    repeat: float | None = None
    weight: float | None = None


@dataclass
class RunSpec:
    """A config resolved for ``distillzoo train``: the typed sections, and what was built from them.

    The model sections (``student``, ``teacher``, ``reference``), ``data`` and ``train``
    are the schema's dataclasses (:mod:`distillzoo.config`) with the config's values;
    ``spec[role]`` is ``getattr(spec, role)``. ``config`` is the config as loaded, for
    what records it (run.json, the trackers' params).
    """

    where: str
    config: DictConfig
    seed: int
    student: ModelConfig
    teacher: ModelConfig | None
    reference: ModelConfig | None
    data: DataConfig
    train: TrainConfig
    output_dir: Path
    resume: str
    world_size: int
    objective: Any = None
    algorithm: Any = None
    #: peft's settings for a LoRA student (None: the student trains in full)
    lora: dict | None = None
    #: the enabled callbacks, built (or only checked, by ``distillzoo check``: then empty)
    callbacks: list = field(default_factory=list)
    tokenizer: ChatTokenizer | None = None
    streams: list[StreamSpec] = field(default_factory=list)
    eval_stream: StreamSpec | None = None
    #: the streams' datasets, tokenized (in the order of ``streams``), and the held-out one
    datasets: list = field(default_factory=list)
    eval_dataset: Any = None
    #: ``train.eval_answers`` checked, and data.eval's prompts and references it scores (read with the data)
    eval_decoding: Any = None
    eval_prompts: list | None = None

    def __getitem__(self, role: str):
        return getattr(self, role)


def sections(cfg: DictConfig, where: str = "<config>") -> RunSpec:
    """The config's sections as a :class:`RunSpec` with nothing checked or built (what an algorithm's ``check``
    reads; :func:`resolve` starts from it)."""

    def typed(node, kind):
        return None if node is None else OmegaConf.to_object(node) if isinstance(node, DictConfig) else kind(**node)

    return RunSpec(where=where, config=cfg, seed=cfg.seed, student=typed(cfg.student, ModelConfig),
                   teacher=typed(cfg.teacher, ModelConfig), reference=typed(cfg.reference, ModelConfig),
                   data=typed(cfg.data, DataConfig) or DataConfig(), train=typed(cfg.train, TrainConfig),
                   output_dir=None if cfg.output_dir is None else Path(cfg.output_dir), resume=cfg.resume,
                   world_size=int(os.environ.get("WORLD_SIZE", "1")))


def build_algorithm(cfg: DictConfig, where: str = "<config>"):
    """``(algorithm, term)``: the config's algorithm built with its objective (every term summed over units).

    ``term`` is the objective term whose kind chose the algorithm when the config
    names none (its ``default_algorithm``), else None.
    """
    from distillzoo.objectives.registry import objective_specs

    terms = objective_terms(cfg)
    objective = build_objective(cfg, reduction="sum")
    name, params = algorithm_choice(cfg)
    inferred_from = None if name is not None else terms[0]
    name = name or objective.default_algorithm
    try:
        spec = algorithm_spec(name, where=f"{where}: algorithm.name")
    except DistillzooError as e:
        raise ConfigError(str(e)) from None
    if objective.kind not in spec.cls.objective_kinds:
        fits = sorted(n for n, s in objective_specs().items() if s.kind in spec.cls.objective_kinds)
        raise ConfigError(f"{where}: {terms[0].path}.name: {terms[0].name!r} is a {objective.kind} objective; "
                          f"algorithm {name!r} trains {'/'.join(spec.cls.objective_kinds)} objectives "
                          f"({', '.join(fits)})")
    return spec.cls(objective, **spec.validate_params(params, f"{where}: algorithm")), inferred_from


def resolve(cfg: DictConfig, where: str = "<config>", *, construct_callbacks: bool = True,
            read_data: bool = True, check_resume: bool = True) -> RunSpec:
    """Everything ``train`` checks before a model loads, as a :class:`RunSpec` (see the module docstring).

    ``construct_callbacks=False`` checks the callbacks without constructing them (``distillzoo
    check``); ``read_data=False`` leaves the records unread (a comparison checking entrants
    that share the data it read once); ``check_resume=False`` leaves what ``output_dir`` holds to the caller (a
    comparison, which skips its finished runs and reruns an unmeasured one afresh).
    """
    algorithm, inferred_from = build_algorithm(cfg, where)
    spec = sections(cfg, where)
    spec.objective, spec.algorithm = algorithm.objective, algorithm
    for role in ROLES:
        section = spec[role]
        if section is not None and section.server is not None and role not in getattr(algorithm, "served_roles", ()):
            raise ConfigError(f"{where}: {role}.server: algorithm {algorithm.name!r} does not read a served {role}; "
                              f"give {role}.path or {role}.tiny (a served teacher: algorithm distill)")
    if cfg.get("teachers") is not None and not getattr(algorithm, "multi_teacher", False):
        raise ConfigError(f"{where}: teachers: algorithm {algorithm.name!r} takes one teacher; several teachers are "
                          "for algorithm distill")
    student = spec.student
    if student is None or (student.path is None) == (student.tiny is None):
        raise ConfigError(f"{where}: student: give exactly one of student.path (a local model directory) or student.tiny")
    if not spec.data.streams:
        raise ConfigError(f"{where}: data.streams: give at least one stream {{name, path, format, repeat|weight}}")
    spec.streams = [_stream(s, f"data.streams[{i}]", algorithm, inferred_from, where)
                    for i, s in enumerate(spec.data.streams)]
    if spec.data.eval is not None:
        spec.eval_stream = _stream(spec.data.eval, "data.eval", algorithm, inferred_from, where)
    algorithm.check(spec, where)
    for role, required in algorithm.roles(spec).items():
        if required:
            require_model(spec, role, f"algorithm {algorithm.name!r}", where)
    for role in ROLES:
        section = spec[role]
        if section is not None and (model_given(section) or section.cache is not None or section.server is not None) \
                and role not in algorithm.reads(spec):
            raise ConfigError(f"{where}: {role}: algorithm {algorithm.name!r} does not use a {role}; remove the "
                              "section (nothing would read it)")
    spec.tokenizer = load_tokenizer(spec.data.tokenizer)
    for role in ("student", *ROLES):
        section = spec[role]
        if section is not None and section.tiny is not None:
            try:
                tiny_kwargs(section.tiny, role)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
        if model_given(section):
            check_vocab(spec, role, spec.tokenizer.vocab_size, where)
        if role != "student" and section is not None and section.lora is not None:
            raise ConfigError(f"{where}: {role}.lora: LoRA adapters are for the student this run trains; the "
                              f"{role} is frozen")
        if section is not None and section.max_memory is not None:
            raise ConfigError(f"{where}: {role}.max_memory: places a model for the inference commands (generate, "
                              "score); to train with a model bigger than one device, shard it with train.parallel: "
                              "fsdp under torchrun")
    _check_values(cfg, where)
    t = spec.train
    if t.eval_answers is not None:
        spec.eval_decoding = _eval_decoding(t.eval_answers, spec, algorithm, where)
    meta = meta_model(student, "student")  # its config on the meta device: module names and size, no weights
    if student.lora is not None:
        modules = lora.module_names(meta)
        spec.lora = lora.check(student.lora, f"{where}: student.lora", ties_head(student), modules)
        if t.parallel == "fsdp":
            raise ConfigError(f"{where}: train.parallel: a LoRA student trains under ddp (its adapters are small; "
                              "the frozen base is replicated); fsdp is for students trained in full")
    for key, choices in (("precision", PRECISIONS), ("parallel", PARALLEL)):
        if getattr(t, key) not in choices:
            raise ConfigError(f"{where}: train.{key}: {getattr(t, key)!r} is not one of {list(choices)}")
    if t.batch_size % spec.world_size:
        raise ConfigError(f"{where}: train.batch_size={t.batch_size} is not divisible by the {spec.world_size} ranks")
    if spec.resume not in RESUME:
        raise ConfigError(f"{where}: resume: {spec.resume!r} is not one of {list(RESUME)}")
    if spec.output_dir is None:
        raise ConfigError(f"{where}: output_dir: give a directory for checkpoints, metrics and the final student")
    check_writable(spec.output_dir, where)
    if check_resume:
        RunDir(spec.output_dir, 0, where).check_resumable(cfg, spec.resume)  # what resuming would refuse, read only
    n_params = parameter_count(student, meta)
    if n_params is not None and int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes
        check_space(spec.output_dir, n_params, bool(t.checkpoint_every), where)
    spec.callbacks = build_callbacks(cfg, where, construct=construct_callbacks)
    if read_data:
        read(spec)
    return spec


def read(spec: RunSpec) -> None:
    """Read and tokenize every record of the streams and the held-out set into ``spec.datasets`` and
    ``spec.eval_dataset``, and check how the streams mix; a bad record fails naming its file and line."""
    from distillzoo.training.streams import MixedStreams, Stream

    spec.datasets = [_dataset(s, spec) for s in spec.streams]
    MixedStreams([Stream(s.name, d, s.repeat, s.weight) for s, d in zip(spec.streams, spec.datasets)],
                 seed=spec.seed, samples_per_epoch=spec.data.samples_per_epoch)  # its rules, checked once here
    spec.eval_dataset = None if spec.eval_stream is None else _dataset(spec.eval_stream, spec)
    if spec.eval_decoding is not None:
        from distillzoo.teacher.evaluation import read_split

        e = spec.eval_stream
        spec.eval_prompts = read_split(e.path, e.format, spec.tokenizer, system=spec.data.system,
                                       max_length=spec.data.max_length, columns=e.columns)


def _eval_decoding(raw: dict, spec: RunSpec, algorithm, where: str):
    """``train.eval_answers`` as a :class:`~distillzoo.teacher.evaluation.Decoding`, on instruction records."""
    from dataclasses import fields

    from distillzoo.teacher.evaluation import Decoding

    key = "train.eval_answers"
    e = spec.eval_stream
    if e is None or e.records != "instruction" or e.kind == "prepared":
        raise ConfigError(f"{where}: {key}: the student's answers are scored against data.eval's references; give "
                          "data.eval as instruction records (chat, alpaca, dolly, ...; not a prepared directory)")
    known = [f.name for f in fields(Decoding)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: {key}: unknown key(s) {unknown}; it takes {known}")
    if not spec.train.eval_every:
        raise ConfigError(f"{where}: {key}: the answers are drawn at each held-out evaluation, and "
                          "train.eval_every is 0 (none); set train.eval_every")
    try:
        return Decoding(**dict(raw))
    except DistillzooError as err:
        raise ConfigError(f"{where}: {key}: {str(err).removeprefix('decoding: ')}") from None


def _stream(stream: StreamConfig, key: str, algorithm, inferred_from, where: str) -> StreamSpec:
    """A stream's kind, format and records, checked against what the algorithm reads."""
    path = Path(stream.path)
    found = table_kind(path)
    if found == "prepared":
        if stream.columns:
            raise ConfigError(f"{where}: {key}.columns: {path} is a prepared directory (tokenized already); "
                              "columns apply to record files and datasets directories")
        records, what = "instruction", "a prepared directory"
    elif found is not None:
        if stream.format is None:
            raise ConfigError(f"{where}: {key}.format: {path} holds records ({found}); name their format "
                              "(dolly, alpaca, chat, preference, ...)")
        try:
            records, what = format_records(stream.format), f"format {stream.format!r}"
        except DistillzooError as e:
            raise ConfigError(f"{where}: {key}.format: {e}") from None
    elif path.is_dir():
        raise ConfigError(f"{where}: {key}.path: {path} is a directory, but neither a prepared one (meta.json) "
                          "nor a datasets save_to_disk one (state.json)")
    else:
        raise ConfigError(f"{where}: {key}.path: {str(path)!r} does not exist")
    held_out = key == "data.eval"
    wanted = (algorithm.eval_records or algorithm.records) if held_out else algorithm.records
    if records != wanted:
        formats = f"{wanted} formats: {', '.join(formats_of(wanted))}"
        if inferred_from is not None and not held_out:
            term = inferred_from
            raise ConfigError(f"{where}: {term.path}.name: {term.name!r} is a {algorithm.objective.kind} objective, "
                              f"trained by algorithm {algorithm.name!r} on {wanted} records, but {key} "
                              f"({what}) holds {records} records; give {wanted} data ({formats}) or choose "
                              f"algorithm.name")
        raise ConfigError(f"{where}: {key}: {what} holds {records} records, but algorithm {algorithm.name!r} "
                          f"{'evaluates' if held_out else 'trains'} on {wanted} records ({formats})")
    if not held_out and stream.repeat is None and stream.weight is None:
        raise ConfigError(f"{where}: {key}: give a repeat count or a weight")
    return StreamSpec(stream.name, path, found, stream.format, None if stream.columns is None else
                      dict(stream.columns), records, stream.repeat, stream.weight)


def _dataset(stream: StreamSpec, spec: RunSpec):
    from distillzoo.data.pairs import PreferenceDataset
    from distillzoo.data.shards import ConversationDataset, TokenShards

    data = spec.data
    if stream.records == "preference":
        return PreferenceDataset(stream.path, spec.tokenizer, format=stream.format, max_length=data.max_length,
                                 system=data.system, columns=stream.columns)
    if stream.kind == "prepared":
        return TokenShards(stream.path)
    return ConversationDataset(stream.path, stream.format, spec.tokenizer, max_length=data.max_length,
                               system=data.system, columns=stream.columns)


def _at_least(low: float):
    return lambda v: math.isfinite(v) and v >= low


# (key, test, what it must be); None passes where the schema allows it
_VALUE_RULES = (
    ("seed", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32) (numpy's seed range)"),
    ("train.steps", _at_least(1), "an integer >= 1"),
    ("train.batch_size", _at_least(1), "an integer >= 1"),
    ("train.micro_batch_size", _at_least(1), "an integer >= 1, or null for the whole per-rank batch"),
    ("train.lr", lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    ("train.weight_decay", _at_least(0), "a finite number >= 0"),
    ("train.warmup_steps", _at_least(0), "an integer >= 0"),
    ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("train.max_grad_norm", lambda v: math.isfinite(v) and v > 0, "a finite number > 0, or null for no clipping"),
    ("train.log_every", _at_least(0), "an integer >= 0 (0: no metrics.jsonl)"),
    ("train.eval_every", _at_least(0), "an integer >= 0 (0: no held-out evaluation)"),
    ("train.checkpoint_every", _at_least(0), "an integer >= 0 (0: no checkpoints)"),
    ("data.max_length", _at_least(1), "an integer >= 1 (tokens per example)"),
    ("data.samples_per_epoch", _at_least(1), "an integer >= 1, or null for the sum of the stream sizes"),
)


def _check_values(cfg: DictConfig, where: str) -> None:
    """Numbers the schema types but cannot bound: a negative lr, a zero micro-batch, a negative max_length."""
    for key, ok, what in _VALUE_RULES:
        value = OmegaConf.select(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{where}: {key}: {value!r} is not valid; it must be {what}")
