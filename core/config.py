"""Config: omegaconf YAML in struct mode, ``key=value`` overrides, objectives by name.

A config selects one objective or a weighted list::

    objective: {name: fkl, temperature: 2.0}
    # or
    objectives:
      - {name: fkl, weight: 0.5}
      - {name: rkl, weight: 0.5}

Unknown keys, unknown objective names and invalid parameters fail with the file
and line (or the override) that caused them, the valid choices and a "did you mean".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from distillzoo.errors import ConfigError, DistillzooError, did_you_mean
from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM


def _doc(text: str, default: Any = MISSING, factory: Any = None):
    """A schema field with its documentation (what ``docs/reference/config.md`` is generated from)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    """A model: a local transformers directory, a tiny Qwen2 built from a config, or a cache read instead."""

    path: Optional[str] = _doc("a local transformers model directory (config.json and weights); nothing is downloaded",
                               None)
    tiny: Optional[Dict[str, Any]] = _doc(
        "a randomly initialised Qwen2-architecture model built from these arguments: vocab_size (151936), "
        "hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size, tie_word_embeddings (true), seed", None)
    cache: Optional[str] = _doc("teacher: a `distillzoo cache-teacher` directory; reference: a `distillzoo "
                                "reference-cache` file, read instead of running the model", None)
    top_k: Optional[int] = _doc("with cache: the k the run expects (the cache's manifest must agree); with server: "
                                "the log-probs per token asked of the server (its --max-logprobs bounds it)", None)
    server: Optional[str] = _doc("the base URL of an OpenAI-compatible server (vllm serve, distillzoo serve) used "
                                 "instead of a model: train's teacher (top-k by vLLM's prompt_logprobs), and the "
                                 "answering models of generate", None)
    model: Optional[str] = _doc("with server: the served model's name, checked against its /v1/models", None)
    prefetch: int = _doc("teacher only, with server: the steps ahead whose top-k is fetched while the student computes (0: "
                         "fetched when the step needs it); never changes which examples a step draws", 1)
    api: str = _doc("teacher only, with server: how it scores, openai (vLLM's prompt_logprobs on /v1/completions: vllm serve, "
                    "distillzoo serve) or sglang (SGLang's /generate with input_top_logprobs)", "openai")
    lora: Optional[Dict[str, Any]] = _doc(
        "the student only: LoRA adapters instead of full training, {r, alpha, dropout, target_modules, train_head} "
        "(target_modules: names, a regular expression or all-linear, as peft takes them)", None)
    max_memory: Optional[Dict[str, Any]] = _doc(
        "generate / score: spread a model bigger than one device, {gpu: 70GiB, cpu: 200GiB}", None)


@dataclass
class StreamConfig:
    """One data stream: records with their format, or a `distillzoo prepare` directory."""

    name: str = _doc("the stream's name (in metrics and the mixing state)")
    path: str = _doc("JSONL, JSON, Parquet, Arrow, a datasets save_to_disk directory, or a prepared directory")
    format: Optional[str] = _doc("the records' data format: dolly, alpaca, chat, preference or a plugin's", None)
    columns: Optional[Dict[str, str]] = _doc("{format field: dataset column}, for datasets named differently", None)
    repeat: Optional[float] = _doc("examples per epoch as a multiple of the stream's size (give this or weight)", None)
    weight: Optional[float] = _doc("the stream's share of an epoch of samples_per_epoch (give this or repeat)", None)


@dataclass
class DataConfig:
    """The training data: streams mixed by repeat count or weight, a held-out set, tokenization."""

    streams: List[StreamConfig] = _doc("the training streams, mixed deterministically", factory=list)
    eval: Optional[StreamConfig] = _doc("the held-out set, evaluated every train.eval_every steps", None)
    max_length: int = _doc("tokens per example; longer ones are cut", 512)
    samples_per_epoch: Optional[int] = _doc("examples per epoch with weighted streams (default: the sum of the "
                                            "stream sizes)", None)
    tokenizer: Optional[str] = _doc("a local tokenizer directory (default: the embedded Qwen vocabulary)", None)
    system: Optional[str] = _doc("the system message of conversations that have none (null: none)",
                                 QWEN_DEFAULT_SYSTEM)


@dataclass
class TrainConfig:
    """The optimisation: steps, batches, AdamW and its schedule, logging, checkpoints, devices."""

    steps: int = _doc("optimiser steps", 100)
    batch_size: int = _doc("examples per step, over all ranks and micro-batches", 8)
    micro_batch_size: Optional[int] = _doc("examples per forward pass on one rank (null: the rank's whole share)",
                                           None)
    lr: float = _doc("AdamW's peak learning rate", 1e-4)
    weight_decay: float = _doc("AdamW's weight decay", 0.0)
    warmup_steps: int = _doc("linear warmup steps before the cosine decay", 0)
    min_lr_ratio: float = _doc("the cosine decay's floor, as a fraction of lr", 0.1)
    max_grad_norm: Optional[float] = _doc("gradient clipping norm (null: none)", 1.0)
    log_every: int = _doc("steps between metrics.jsonl records (0: none)", 10)
    eval_every: int = _doc("steps between held-out evaluations of data.eval (0: none)", 0)
    eval_answers: Optional[Dict[str, Any]] = _doc(
        "at each held-out evaluation, also the student's own answers to data.eval's prompts, scored against the "
        "references (eval/rouge_l, eval/exact_match, eval/length_ratio): {samples: 1, temperature: 0.0, top_p: 1.0, "
        "max_new_tokens: null, seed: 0}, the keys of distillzoo eval's decoding (null: teacher-forced metrics only)",
        None)
    checkpoint_every: int = _doc("steps between checkpoints (0: none)", 0)
    progress: bool = _doc("a progress bar on the terminal", True)
    precision: str = _doc("auto (bf16 autocast on CUDA, fp32 on the CPU), fp32 or bf16", "auto")
    parallel: str = _doc("under torchrun: ddp (a replicated student) or fsdp (FSDP2 shards of student and teacher)",
                         "ddp")


@dataclass
class GenerateConfig:
    """``distillzoo generate``: who answers which prompts, how, and where the JSONL goes."""

    prompts: Optional[str] = _doc("the prompts: records in any instruction format (the last reply is dropped)", None)
    format: str = _doc("the prompts' data format", "chat")
    columns: Optional[Dict[str, str]] = _doc("{format field: dataset column}", None)
    out: Optional[str] = _doc("the JSONL file to write (a rerun appends what is missing)", None)
    mode: str = _doc("responses: generate.model answers (chat records); pairs: teacher = chosen, student = "
                     "rejected (preference records)", "responses")
    model: str = _doc("who answers in responses mode: teacher or student", "teacher")
    max_new_tokens: int = _doc("the longest answer", 256)
    temperature: float = _doc("sampling temperature (0: greedy)", 1.0)
    top_k: int = _doc("top-k sampling (0: off)", 0)
    top_p: float = _doc("nucleus sampling (1: off)", 1.0)
    batch_size: int = _doc("prompts per batch", 16)
    progress: bool = _doc("a progress bar", True)


@dataclass
class ScoreConfig:
    """``distillzoo score``: which scorer rates which samples, and where the scores go."""

    data: Optional[str] = _doc("the records to score", None)
    format: str = _doc("their data format", "chat")
    columns: Optional[Dict[str, str]] = _doc("{format field: dataset column}", None)
    out: Optional[str] = _doc("the {id, score} JSONL to write", None)
    scorer: Optional[Dict[str, Any]] = _doc("{name: mfd, ...params}: a scorer registered through register_scorers",
                                            None)
    batch_size: int = _doc("samples per batch", 8)
    progress: bool = _doc("a progress bar", True)


@dataclass
class CurateConfig:
    """``distillzoo curate``: which records go through which stages, and where the curated records go."""

    data: Any = _doc("the records to curate: a file or directory, or a list of them (JSONL, JSON, Parquet, Arrow, "
                     "datasets directories)", None)
    format: str = _doc("their data format (chat, alpaca, dolly, preference, a plugin's)", "chat")
    columns: Optional[Dict[str, str]] = _doc("{format field: dataset column}", None)
    out: Optional[str] = _doc("the directory to write: curated.jsonl, dropped/, rejects.jsonl, report.md", None)
    stages: Optional[List[Dict[str, Any]]] = _doc("[{name, ...params}]: the stages, in order (dedup, decontaminate, "
                                                  "quality, balance, tag, score, expand, rewrite, a plugin's); the model "
                                                  "stages read the config's teacher, student or reference", None)
    eval: Optional[List[Dict[str, Any]]] = _doc("[{path, format, columns}]: the evaluation sets decontaminate "
                                                "compares against", None)
    malformed: str = _doc("refuse: stop at a malformed record, naming its file and line, before writing anything; "
                          "reject: move it to rejects.jsonl and go on", "refuse")
    shard_size: int = _doc("records per shard, the unit a killed run resumes from", 10000)


@dataclass
class DistillConfig:
    """A distillzoo config: every key a config may hold (struct mode: unknown keys fail)."""

    objective: Optional[Dict[str, Any]] = _doc("{name, ...params}: one objective by name", None)
    objectives: Optional[List[Dict[str, Any]]] = _doc("[{name, weight, ...params}]: a weighted mixture", None)
    algorithm: Optional[Dict[str, Any]] = _doc(
        "{name, ...params}: the training algorithm (distill, preference, dpkd, a plugin's) and its own parameters "
        "(`distillzoo show NAME`); default: the objective's", None)
    seed: int = _doc("the seed of data order, initialisation, sampling and dropout", 0)
    student: Optional[ModelConfig] = _doc("the model trained", None)
    teacher: Optional[ModelConfig] = _doc("the model distilled from (a model, or a teacher cache)", None)
    teachers: Optional[List[Dict[str, Any]]] = _doc(
        "distill: several teachers instead of teacher, [{name, server|cache, model, top_k, api, streams, route | "
        "weight}]: each routed the examples of its streams whose record fields match its route ({language: zh}), "
        "or all mixed by weight on the same tokens", None)
    reference: Optional[ModelConfig] = _doc("the frozen reference of preference training (a model, or a "
                                            "reference-cache file)", None)
    callbacks: Optional[List[Dict[str, Any]]] = _doc("[{name, ...params}]: trainer callbacks registered through "
                                                     "register_trainer_callbacks (tensorboard, mlflow, a plugin's)",
                                                     None)
    data: Optional[DataConfig] = _doc("the training data", None)
    train: TrainConfig = _doc("the optimisation", factory=TrainConfig)
    output_dir: Optional[str] = _doc("checkpoints, metrics.jsonl and the final student (final/)", None)
    resume: str = _doc("auto: continue from the newest intact checkpoint of the same run; never: start over", "auto")
    generate: Optional[GenerateConfig] = _doc("`distillzoo generate`'s section", None)
    score: Optional[ScoreConfig] = _doc("`distillzoo score`'s section", None)
    curate: Optional[CurateConfig] = _doc("`distillzoo curate`'s section", None)


#: keys that moved, and where they live now: a config giving one is refused naming the new key
MOVED = {
    "train.on_policy": "algorithm.on_policy (algorithm: {name: distill, on_policy: 0.5})",
    "train.on_policy_max_new_tokens": "algorithm.max_new_tokens (of algorithm 'distill')",
    "train.on_policy_temperature": "algorithm.temperature (of algorithm 'distill')",
}


@dataclass(frozen=True)
class ObjectiveTerm:
    """One validated entry of ``objective`` / ``objectives``."""

    name: str
    weight: float
    params: dict
    path: str


class _Locator:
    """Maps config paths (``objectives[1].name``) to ``file:line`` or the override that set them."""

    def __init__(self, source: str, text: str, overrides: Sequence[str]) -> None:
        self.source = source
        self.lines: dict[str, int] = {}
        try:
            self._walk(yaml.compose(text), "")
        except yaml.YAMLError:
            pass  # reported by the loader with its own mark
        self.overrides = {o.split("=", 1)[0].strip(): o for o in overrides}

    def _walk(self, node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                self.lines[sub] = key.start_mark.line + 1
                self._walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = f"{path}[{i}]"
                self.lines[sub] = item.start_mark.line + 1
                self._walk(item, sub)

    def __call__(self, path: str) -> str:
        if path in self.overrides:
            return f"override {self.overrides[path]!r}"
        return self.in_file(path)

    def in_file(self, path: str) -> str:
        probe = path
        while probe:
            if probe in self.lines:
                return f"{self.source}:{self.lines[probe]}"
            probe = probe.rpartition(".")[0] if "." in probe else probe.rpartition("[")[0]
        return self.source


def load_config(source: str | Path | dict, overrides: Sequence[str] = ()) -> DictConfig:
    """Load a YAML file (or a dict), apply ``key=value`` overrides, validate, return it.

    The result is a struct-mode DictConfig; its objectives are checked against the
    catalogue, so :func:`build_objective` on it cannot fail on names or params.
    """
    if isinstance(source, dict):
        text, where = yaml.safe_dump(source), "<dict>"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text, where = path.read_text(encoding="utf-8"), str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{where}{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys, got {type(raw).__name__}")
    locate = _Locator(where, text, overrides)
    _refuse_moved(raw, overrides, locate)
    _refuse_teacher_only(raw, overrides, locate)
    _check_containers(DistillConfig, raw, "", locate.in_file)
    schema = OmegaConf.structured(DistillConfig)
    cfg = _merge(schema, OmegaConf.create(raw), locate.in_file)
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, _, value = override.partition("=")
        if re.search(r"\[\d+\]|\.\d+(\.|$)", key):  # into a list item: data.streams[0].path or data.streams.0.path
            cfg = _update_item(cfg, key.strip(), value, f"override {override!r}")
            continue
        cfg = _merge(cfg, OmegaConf.from_dotlist([override]), lambda key: f"override {override!r}")
    OmegaConf.set_struct(cfg, True)
    alone = cfg.generate is not None or cfg.score is not None or cfg.curate is not None
    if not alone or cfg.objective is not None or cfg.objectives is not None:
        objective_terms(cfg, locate)  # a config for distillzoo generate, score or curate alone needs no objective
    algorithm_choice(cfg, locate)
    return cfg


def _refuse_moved(raw: dict, overrides: Sequence[str], locate: _Locator) -> None:
    """A key that moved (see :data:`MOVED`) fails naming where it lives now."""
    given = {o.partition("=")[0].strip(): f"override {o!r}" for o in overrides}
    for key, now in MOVED.items():
        section, _, leaf = key.partition(".")
        if isinstance(raw.get(section), dict) and leaf in raw[section]:
            given.setdefault(key, locate.in_file(key))
        if key in given:
            raise ConfigError(f"{given[key]}: {key} is an algorithm's parameter now: use {now}")


#: ModelConfig keys only a teacher's section is read for (prefetch in train, api in every teacher command)
TEACHER_ONLY = ("prefetch", "api")


def _refuse_teacher_only(raw: dict, overrides: Sequence[str], locate: _Locator) -> None:
    """``student.prefetch`` and the like fail: nothing reads them outside ``teacher``."""
    given = {o.partition("=")[0].strip(): f"override {o!r}" for o in overrides}
    for role in ("student", "reference"):
        for key in TEACHER_ONLY:
            name = f"{role}.{key}"
            if isinstance(raw.get(role), dict) and key in raw[role]:
                given.setdefault(name, locate.in_file(name))
            if name in given:
                raise ConfigError(f"{given[name]}: {name}: only the teacher's section is read for {key} "
                                  f"(teacher.{key}); remove it")


def _container_kind(hint) -> tuple[str | None, Any]:
    """``("mapping", dataclass or None)``, ``("list", item hint)`` or ``(None, None)`` for a schema type hint."""
    import dataclasses
    import typing

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin is typing.Union and len(args) == 1:
        return _container_kind(args[0])
    if dataclasses.is_dataclass(hint):
        return "mapping", hint
    if origin in (dict, Dict):
        return "mapping", None
    if origin in (list, List):
        return "list", args[0] if args else None
    return None, None


def _check_containers(schema, raw: Any, path: str, locate: Callable[[str], str]) -> None:
    """A mapping where the schema has a list (or the reverse) fails here, naming the key (omegaconf names none)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if not isinstance(raw, dict) or f.name not in raw or raw[f.name] is None:
            continue
        key = f"{path}.{f.name}" if path else f.name
        kind, inner = _container_kind(hints[f.name])
        value = raw[f.name]
        if kind == "mapping" and not isinstance(value, dict) or kind == "list" and not isinstance(value, list):
            got = "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else repr(value)
            raise ConfigError(f"{locate(key)}: {key} must be {'a mapping of keys' if kind == 'mapping' else 'a list'}, "
                              f"got {got}")
        if kind == "mapping" and inner is not None:
            _check_containers(inner, value, key, locate)
        elif kind == "list" and dataclasses.is_dataclass(inner):
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise ConfigError(f"{locate(f'{key}[{i}]')}: {key}[{i}] must be a mapping of keys, got {item!r}")
                _check_containers(inner, item, f"{key}[{i}]", locate)


def _update_item(cfg: DictConfig, key: str, value: str, where: str) -> DictConfig:
    """``key=value`` where the key goes through a list index (OmegaConf.merge would replace the whole list)."""
    try:
        parsed = OmegaConf.from_dotlist([f"value={value}"]).value
        cfg = cfg.copy()
        OmegaConf.set_struct(cfg, True)
        OmegaConf.update(cfg, key, parsed, merge=True)
    except (OmegaConfBaseException, IndexError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: {key}: {reason}") from None
    return cfg


def _merge(base: DictConfig, update: DictConfig, locate: Callable[[str], str]) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        key = str(e.full_key)
        parent = key.rpartition(".")[0]
        node = OmegaConf.select(base, parent) if parent else base
        valid = [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []
        leaf = key.rpartition(".")[2]
        raise ConfigError(
            f"{locate(key)}: unknown config key {key!r}. Valid keys"
            f"{' under ' + repr(parent) if parent else ''}: {', '.join(valid)}." + did_you_mean(leaf, valid)
        ) from None
    except TypeError as e:  # e.g. a mapping where the schema has a list
        raise ConfigError(f"{locate('')}: {e}") from None
    except OmegaConfBaseException as e:
        key = str(getattr(e, "full_key", "") or "")
        reason = str(e).splitlines()[0]  # omegaconf appends full_key/object_type lines
        raise ConfigError(f"{locate(key)}: {key + ': ' if key else ''}{reason}") from None


def objective_terms(cfg: DictConfig, locate: _Locator | None = None) -> list[ObjectiveTerm]:
    """The validated objective terms of a config: (name, weight, params, config path)."""
    from distillzoo.objectives.registry import objective_spec, objective_specs

    locate = locate or _Locator("<config>", "", ())
    single, many = cfg.get("objective"), cfg.get("objectives")
    if single is not None and many is not None:
        raise ConfigError(f"{locate('objectives')}: give either 'objective' or 'objectives', not both")
    if single is None and many is None:
        raise ConfigError(
            f"{locate.source}: no objective selected: add `objective: {{name: fkl}}` or a weighted "
            f"`objectives:` list. Available: {', '.join(sorted(objective_specs()))}"
        )
    if single is not None:
        entries = [("objective", single)]
    else:
        if not isinstance(many, ListConfig) or len(many) == 0:
            raise ConfigError(f"{locate('objectives')}: 'objectives' must be a non-empty list of {{name, weight, ...}}")
        entries = [(f"objectives[{i}]", item) for i, item in enumerate(many)]
    terms = []
    for path, node in entries:
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{locate(path)}: {path} must be a mapping with a 'name', got {node!r}")
        body = OmegaConf.to_container(node, resolve=True)
        name = body.pop("name", None)
        if name is None:
            raise ConfigError(f"{locate(path)}: {path} has no 'name'. Available: {', '.join(sorted(objective_specs()))}")
        try:
            spec = objective_spec(str(name), where=f"{locate(path + '.name')}: {path}.name")
        except DistillzooError as e:
            raise ConfigError(str(e)) from None
        weight = body.pop("weight", 1.0)
        if single is not None and weight != 1.0:
            raise ConfigError(f"{locate(path + '.weight')}: a single 'objective' takes no weight; use 'objectives:' to mix")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"{locate(path + '.weight')}: {path}.weight must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"{locate(path + '.weight')}: {path}.weight must be a finite number > 0, got {weight!r}; "
                              "leave a term out rather than weigh it by 0")
        params = {}
        for key, value in body.items():
            key_path = f"{path}.{key}"
            try:
                where = f"{locate(key_path)}: {key_path} (objective {spec.name!r})"
                params[key] = spec.validate_params({key: value}, where=where)[key]
            except DistillzooError as e:
                raise ConfigError(str(e)) from None
        terms.append(ObjectiveTerm(spec.name, float(weight), params, path))
    return terms


def algorithm_choice(cfg: DictConfig, locate: _Locator | None = None) -> tuple[str | None, dict]:
    """The ``algorithm`` section as ``(name, params)``, checked against the registered algorithm; ``(None, {})``
    when the config has none (the trainer then takes the objective's default algorithm)."""
    from distillzoo.hooks.manager import algorithm_spec

    locate = locate or _Locator("<config>", "", ())
    node = cfg.get("algorithm")
    if node is None:
        return None, {}
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{locate('algorithm')}: algorithm must be a mapping {{name: ..., params}}, got {node!r}")
    body = OmegaConf.to_container(node, resolve=True)
    name = body.pop("name", None)
    try:
        spec = algorithm_spec(str(name), where=f"{locate('algorithm.name')}: algorithm.name")
    except DistillzooError as e:
        raise ConfigError(str(e)) from None
    params = {}
    for key, value in body.items():
        try:
            where = f"{locate('algorithm.' + key)}: algorithm.{key} (algorithm {spec.name!r})"
            params[key] = spec.validate_params({key: value}, where=where)[key]
        except DistillzooError as e:
            raise ConfigError(str(e)) from None
    return spec.name, params


def build_objective(cfg: DictConfig, **overrides: Any):
    """The objective a config selects: one objective, or a weighted Mixture of them (each term built with
    its params and ``overrides``, e.g. ``reduction="sum"``)."""
    from distillzoo.objectives.registry import build_objective as build

    terms = objective_terms(cfg)
    try:
        return build([(t.weight, t.name, t.params) for t in terms], mixture=cfg.get("objective") is None,
                     **overrides)
    except DistillzooError as e:
        raise ConfigError(str(e)) from None


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """The config's leaves by dotted key: ``objective.name``, ``data.streams[0].path``, ..."""
    flat: dict[str, Any] = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            flat[key] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
