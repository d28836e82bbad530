"""The training loop of ``distillzoo train``: every algorithm, one loop.

Read top to bottom: validate the config (before any model is loaded), data
streams, models, the algorithm's preparation, optimiser and schedule, resume,
then the loop. What a step computes belongs to the training algorithm the config
selects (:mod:`distillzoo.algorithm`; built-ins in ``distillzoo.plugins.algorithms``:
``distill``, ``preference``, ``dpkd``); this loop owns everything they share and
special-cases none of them.

Each optimiser step takes ``train.batch_size`` examples (split over ranks and
micro-batches). The algorithm turns this rank's examples into micro-batches, each
with a count (valid tokens, or pairs); the counts are summed over micro-batches
and ranks before the first backward, and the loss of every micro-batch, summed
over its units, is divided by that global count, so accumulation and ranks weigh
every unit alike. The loss is the forward of one module,
:class:`~distillzoo.algorithm.Models`, that holds student, teacher and reference.

Under ``torchrun`` that module is wrapped in DDP (``train.parallel: ddp``; teacher
and reference are neither broadcast nor reduced) or sharded with FSDP2
(``train.parallel: fsdp``: ``fully_shard`` on every decoder layer of each model,
the rest in the root unit). ``train.precision`` picks bf16 autocast (the default on
CUDA) or fp32 (the default on CPU).

Checkpoints (``train.checkpoint_every``) hold the weights, the optimiser,
schedule, data order, the algorithm's state and RNG states; they are written
under a temporary name and renamed, and ``resume: auto`` continues from the newest
one, giving the weights an uninterrupted run would have reached. The final
student is saved with ``save_pretrained`` under ``output_dir/final``. Callbacks a
config enables (``callbacks:``) are called at start, at each logged step, after
each evaluation and checkpoint, and at the end.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .algorithm import ROLES, Models, Run
from .callbacks import Callbacks, build_callbacks
from . import lora
from .causal_lm import check_vocab, model_from_config, model_given, parameter_count, require_model, ties_head
from .config import algorithm_choice, objective_terms
from .data import PreferenceDataset, format_records, formats_of
from .errors import ConfigError, DistillzooError, NonFiniteError
from .manager import algorithm_spec
from .manager import objective as make_objective
from .run_dir import RunDir, check_space, check_writable
from .shards import ConversationDataset, TokenShards
from .streams import MixedStreams, Stream
from .tables import kind as table_kind

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


# ---------------------------------------------------------------------------- config checks (no model loaded)
def validate(cfg: DictConfig, where: str = "<config>", build_callbacks_too: bool = True):
    """Everything that can be checked without loading a model: names, paths, sizes, what the algorithm needs.

    Returns the algorithm (built with the objective, its own checks done) and the enabled callbacks
    (checked but not built with ``build_callbacks_too=False``, as ``distillzoo check`` does).
    """
    algorithm, inferred_from = build_algorithm(cfg, where)
    if cfg.student is None or (cfg.student.path is None) == (cfg.student.tiny is None):
        raise ConfigError(f"{where}: student: give exactly one of student.path (a local model directory) or student.tiny")
    if cfg.data is None or not cfg.data.streams:
        raise ConfigError(f"{where}: data.streams: give at least one stream {{name, path, format, repeat|weight}}")
    streams = list(enumerate(cfg.data.streams)) + ([("eval", cfg.data.eval)] if cfg.data.eval is not None else [])
    for i, stream in streams:
        key = "data.eval" if i == "eval" else f"data.streams[{i}]"
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
        wanted = (algorithm.eval_records or algorithm.records) if i == "eval" else algorithm.records
        if records != wanted:
            formats = f"{wanted} formats: {', '.join(formats_of(wanted))}"
            if inferred_from is not None and i != "eval":
                term = inferred_from
                raise ConfigError(f"{where}: {term.path}.name: {term.name!r} is a {algorithm.objective.kind} objective, "
                                  f"trained by algorithm {algorithm.name!r} on {wanted} records, but {key} "
                                  f"({what}) holds {records} records; give {wanted} data ({formats}) or choose "
                                  f"algorithm.name")
            raise ConfigError(f"{where}: {key}: {what} holds {records} records, but algorithm {algorithm.name!r} "
                              f"{'evaluates' if i == 'eval' else 'trains'} on {wanted} records ({formats})")
        if i != "eval" and stream.repeat is None and stream.weight is None:
            raise ConfigError(f"{where}: {key}: give a repeat count or a weight")
    if cfg.train.on_policy and not algorithm.reads_on_policy:
        raise ConfigError(f"{where}: train.on_policy: GKD's on-policy mixing is part of algorithm 'distill', not "
                          f"{algorithm.name!r}" + ("; for student samples in DPKD use algorithm: {name: dpkd, online: "
                                                   "true}" if algorithm.name == "dpkd" else ""))
    algorithm.check(cfg, where)
    for role, required in algorithm.roles(cfg).items():
        if required:
            require_model(cfg, role, f"algorithm {algorithm.name!r}", where)
    for role in ROLES:
        section = cfg[role]
        if section is not None and (model_given(section) or section.cache is not None) and role not in algorithm.reads(cfg):
            raise ConfigError(f"{where}: {role}: algorithm {algorithm.name!r} does not use a {role}; remove the "
                              "section (nothing would read it)")
    from .tokenizer import load_tokenizer

    tokenizer_vocab = load_tokenizer(cfg.data.tokenizer).vocab_size
    for role in ("student", *ROLES):
        if model_given(cfg[role]):
            check_vocab(cfg, role, tokenizer_vocab, where)
        if role != "student" and cfg[role] is not None and cfg[role].lora is not None:
            raise ConfigError(f"{where}: {role}.lora: LoRA adapters are for the student this run trains; the "
                              f"{role} is frozen")
        if cfg[role] is not None and cfg[role].max_memory is not None:
            raise ConfigError(f"{where}: {role}.max_memory: places a model for the inference commands (generate, "
                              "score); to train with a model bigger than one device, shard it with train.parallel: "
                              "fsdp under torchrun")
    t = cfg.train
    _check_values(cfg, where)
    if cfg.student.lora is not None:
        lora.check(cfg.student.lora, f"{where}: student.lora", ties_head(cfg.student))
        if t.parallel == "fsdp":
            raise ConfigError(f"{where}: train.parallel: a LoRA student trains under ddp (its adapters are small; "
                              "the frozen base is replicated); fsdp is for students trained in full")
    for key, choices in (("precision", PRECISIONS), ("parallel", PARALLEL)):
        if t[key] not in choices:
            raise ConfigError(f"{where}: train.{key}: {t[key]!r} is not one of {list(choices)}")
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"{where}: resume: {cfg.resume!r} is not one of ['auto', 'never']")
    if cfg.output_dir is None:
        raise ConfigError(f"{where}: output_dir: give a directory for checkpoints, metrics and the final student")
    check_writable(cfg.output_dir, where)
    n_params = parameter_count(cfg.student)
    if n_params is not None and int(os.environ.get("RANK", "0")) == 0:  # rank 0 writes
        check_space(cfg.output_dir, n_params, bool(cfg.train.checkpoint_every), where)
    return algorithm, build_callbacks(cfg, where, construct=build_callbacks_too)


def _at_least(low: float):
    return lambda v: math.isfinite(v) and v >= low


# (key, test, what it must be); None passes where the schema allows it
_VALUE_RULES = (
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


def build_algorithm(cfg: DictConfig, where: str = "<config>"):
    """``(algorithm, term)``: the config's algorithm built with its objective (every term summed over units).

    ``term`` is the objective term whose kind chose the algorithm when the config
    names none (its ``default_algorithm``), else None.
    """
    from .base import Mixture

    terms = objective_terms(cfg)
    built = [(t.weight, make_objective(t.name, **{**t.params, "reduction": "sum"})) for t in terms]
    objective = built[0][1] if cfg.get("objective") is not None else Mixture(built)
    name, params = algorithm_choice(cfg)
    inferred_from = None if name is not None else terms[0]
    name = name or objective.default_algorithm
    try:
        spec = algorithm_spec(name, where=f"{where}: algorithm.name")
    except DistillzooError as e:
        raise ConfigError(str(e)) from None
    if objective.kind not in spec.cls.objective_kinds:
        from .manager import objective_specs

        fits = sorted(n for n, s in objective_specs().items() if s.kind in spec.cls.objective_kinds)
        raise ConfigError(f"{where}: {terms[0].path}.name: {terms[0].name!r} is a {objective.kind} objective; "
                          f"algorithm {name!r} trains {'/'.join(spec.cls.objective_kinds)} objectives "
                          f"({', '.join(fits)})")
    return spec.cls(objective, **spec.validate_params(params, f"{where}: algorithm")), inferred_from


# ---------------------------------------------------------------------------- pieces
def _dataset(stream, records: str, tokenizer, data):
    path = Path(stream.path)
    columns = None if stream.columns is None else dict(stream.columns)
    if records == "preference":
        return PreferenceDataset(path, tokenizer, format=stream.format, max_length=data.max_length, system=data.system,
                                 columns=columns)
    if table_kind(path) == "prepared":
        return TokenShards(path)
    return ConversationDataset(path, stream.format, tokenizer, max_length=data.max_length, system=data.system,
                               columns=columns)


def lr_at(step: int, t) -> float:
    """Linear warmup to train.lr, then cosine decay to min_lr_ratio * lr at train.steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float


# ---------------------------------------------------------------------------- the loop
def train(cfg: DictConfig, where: str = "<config>") -> TrainResult:
    """Validate, take the output directory (one run at a time), and run the loop."""
    algorithm, enabled = validate(cfg, where)
    with RunDir(cfg.output_dir, int(os.environ.get("RANK", "0")), where).owned() as run_dir:
        return _loop(cfg, where, algorithm, enabled, run_dir)


def _loop(cfg: DictConfig, where: str, algorithm, enabled: list, run_dir: RunDir) -> TrainResult:
    from .tokenizer import load_tokenizer

    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        # whoever starts the group ends it, as launch.Launch does: a gloo group left to the interpreter's
        # teardown can abort the process after a finished run ("terminate called without an active exception")
        atexit.register(torch.distributed.destroy_process_group)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if t.batch_size % world:
        raise ConfigError(f"{where}: train.batch_size={t.batch_size} is not divisible by the {world} ranks")
    per_rank = t.batch_size // world
    micro = t.micro_batch_size or per_rank
    callbacks = Callbacks(enabled, rank)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    datasets = [_dataset(s, algorithm.records, tokenizer, cfg.data) for s in cfg.data.streams]
    streams = MixedStreams([Stream(s.name, d, s.repeat, s.weight) for s, d in zip(cfg.data.streams, datasets)],
                           seed=cfg.seed, samples_per_epoch=cfg.data.samples_per_epoch, rank=rank, world_size=world)
    eval_set = None
    if cfg.data.eval is not None:
        eval_set = _dataset(cfg.data.eval, algorithm.eval_records or algorithm.records, tokenizer, cfg.data)

    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    fsdp = distributed and t.parallel == "fsdp"
    student = model_from_config(cfg.student, "student")
    if cfg.student.lora is not None:
        student = lora.apply(student, lora.check(cfg.student.lora, f"{where}: student.lora", ties_head(cfg.student)),
                             cfg.seed)
    run = Run(cfg, where, tokenizer, device, rank, world, datasets + ([eval_set] if eval_set is not None else []),
              student=student.to(device).train())
    for role in algorithm.roles(cfg):
        if model_given(cfg[role]):
            setattr(run, role, model_from_config(cfg[role], role).to(device).eval().requires_grad_(False))
    algorithm.prepare(run)
    student = run.student
    models = Models(student, run.teacher, run.reference, algorithm, bf16)
    step_of = models
    if fsdp:
        step_of = _fully_shard(models)
    elif distributed:
        # teacher and reference are frozen and identical on every rank: neither broadcast nor reduced
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(models, models.frozen())
        step_of = torch.nn.parallel.DistributedDataParallel(models)
    trainable = [p for p in student.parameters() if p.requires_grad]  # a LoRA student: its adapters
    run.call = lambda fn: step_of(call=fn)  # the models used as the loss uses them: inside the wrapper's forward
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay, fused=not fsdp)
    step = 0
    resumed = run_dir.start(cfg, cfg.resume)  # the newest intact checkpoint of this same run, or a fresh start
    if resumed is not None:
        checkpoint, state = resumed
        _load_training_state(student, optimizer, state)
        streams.load_state_dict(state["data"])
        algorithm.load_state_dict(state.get("algorithm") or {})
        _set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        step = state["step"]
        if rank == 0:
            run_dir.truncate_metrics(step)
            print(f"resumed from {checkpoint} at step {step}", file=sys.stderr)
    run.extra["step"] = step
    callbacks.fire("on_train_start", run)

    bar = None
    if t.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=step, desc=f"distillzoo train ({algorithm.name})", dynamic_ncols=True)
    loss_value = float("nan")
    while step < t.steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        batches = algorithm.micro_batches(run, streams.take(per_rank), step, micro)
        counts = _all_reduce(torch.tensor([float(sum(b.count for b in batches)), float(sum(b.tokens for b in batches))],
                                          dtype=torch.float64), distributed)
        n_global, tokens = float(counts[0]), int(counts[1])
        sums: dict[str, torch.Tensor] = {}
        for i, b in enumerate(batches):
            with _gradient_sync(step_of, i == len(batches) - 1, distributed):
                out = step_of(b)
                (out.value * (world / max(n_global, 1.0))).backward()
            _accumulate(sums, {"loss": out.value, **out.metrics})
        norm = _full(torch.nn.utils.clip_grad_norm_(student.parameters(), t.max_grad_norm or float("inf")))
        means = _global_means(sums, n_global, distributed)
        loss_value = means.pop("loss")
        _refuse_non_finite(loss_value, float(norm), step + 1, batches, run_dir, where)  # before the weights move
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": loss_value, "lr": lr_at(step - 1, t), "grad_norm": float(norm),
                  "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if algorithm.unit != "tokens":
            record[algorithm.unit] = int(n_global)
        record.update(means)
        if t.eval_every and eval_set is not None and (step % t.eval_every == 0 or step == t.steps):
            evaluated = evaluate(step_of, algorithm, run, eval_set, micro)
            record.update(evaluated)
            callbacks.fire("on_evaluate", step, evaluated)
        logged = bool(t.log_every) and (step % t.log_every == 0 or step == t.steps
                                        or any(k.startswith("eval/") for k in record))
        if logged and rank == 0:
            run_dir.append_metrics(record)
        if logged:
            callbacks.fire("on_log", step, record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(_progress(record, algorithm))
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
            path = _save_checkpoint(run_dir, step, student, optimizer, streams, algorithm, distributed)
            callbacks.fire("on_checkpoint", step, path)
    if bar is not None:
        bar.close()
    weights = _full_model_state(student) if fsdp else None
    run_dir.save_final(lambda tmp: _save_pretrained(student, weights, tmp))
    if distributed:
        torch.distributed.barrier()
    result = TrainResult(run_dir.path, step, loss_value)
    callbacks.fire("on_train_end", result)
    return result


def _fully_shard(models: Models):
    """FSDP2: each decoder layer of every model is a unit; the rest (embeddings, norms, heads) the root."""
    from torch.distributed.fsdp import fully_shard

    for model in (models.student, models.teacher, models.reference):
        if model is None:
            continue
        layers = getattr(model.get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError(f"train.parallel=fsdp: {type(model).__name__} has no decoder.layers to shard")
        for layer in layers:
            fully_shard(layer)
    return fully_shard(models)


def _gradient_sync(step_of, last: bool, distributed: bool):
    """Reduce gradients only on a step's last micro-batch (DDP no_sync, FSDP2 set_requires_gradient_sync)."""
    if hasattr(step_of, "set_requires_gradient_sync"):
        step_of.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if distributed and not last:
        return step_of.no_sync()
    return contextlib.nullcontext()


def _full(x):
    """A DTensor (FSDP2) as a plain tensor; anything else as is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def _accumulate(sums: dict, values: dict) -> None:
    for key, value in values.items():
        value = value.detach().double().cpu()
        sums[key] = sums[key] + value if key in sums else value


def _global_means(sums: dict, count: float, distributed: bool) -> dict[str, float]:
    """Sums over micro-batches, all-reduced over ranks (one call), divided by the step's global count."""
    keys = sorted(sums)
    total = _all_reduce(torch.stack([sums[k].reshape(()) for k in keys]), distributed)
    return {k: float(v) / max(count, 1.0) for k, v in zip(keys, total.tolist())}


def _refuse_non_finite(loss: float, norm: float, step: int, batches: list, run_dir: RunDir, where: str) -> None:
    """Stop before a non-finite loss or gradient reaches the weights; nothing after it is saved."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    ids = [i for b in batches for i in (b.inputs.get("ids") or getattr(b.inputs.get("batch"), "ids", None) or [])]
    newest = run_dir.checkpoints()
    raise NonFiniteError(f"{where}: step {step}: the loss is {loss} and the gradient norm {norm}; the student was not "
                         "updated and nothing more is saved ("
                         + (f"the newest checkpoint, {newest[0]}, is intact" if newest else "no checkpoint yet")
                         + f"). This step's samples on this rank: {ids[:8]}{' ...' if len(ids) > 8 else ''}. A "
                         "diverging student (lower train.lr) or non-finite data are the usual causes")


def _progress(record: dict, algorithm) -> dict:
    """The progress bar's postfix: the loss, each mixture term's loss, the algorithm's chosen metrics, tokens/s."""
    shown = {"loss": f"{record['loss']:.4f}"}
    for key, value in record.items():
        if key.startswith("loss/") or key in algorithm.progress_metrics:
            shown[key.rpartition("/")[2] if key.startswith("loss/") else key] = f"{value:.4f}"
    shown["tok_s"] = f"{record['tokens_per_s']:.0f}"
    return shown


@torch.no_grad()
def evaluate(step_of, algorithm, run: Run, dataset, batch_size: int) -> dict:
    """The algorithm's held-out metrics over the whole of ``dataset``, each per unit: ``{"eval/<name>": value}``."""
    models = step_of.module if isinstance(step_of, torch.nn.parallel.DistributedDataParallel) else step_of
    was_training = models.student.training
    models.student.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0.0
    examples = [dataset[i] for i in range(len(dataset))]
    for b in algorithm.eval_batches(run, examples, batch_size):
        _accumulate(sums, step_of(b, evaluate=True).metrics)
        count += b.count
    models.student.train(was_training)
    return {f"eval/{k}": float(v) / max(count, 1.0) for k, v in sums.items()}


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _full_model_state(student) -> dict:
    """The student's whole state dict on rank 0 (gathered from the shards under FSDP2), on the CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(student, options=_state_options(cpu_offload=True))


def _checkpoint_model_state(student) -> dict:
    """What a checkpoint keeps of the student: its trainable parameters (all of them, or a LoRA student's
    adapters), gathered on rank 0 and on the CPU. The frozen rest is rebuilt from the config on resume."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(student, options=_state_options(cpu_offload=True, ignore_frozen_params=True))
    frozen = {name for name, p in student.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {key: value for key, value in state.items() if key not in frozen}  # a tied head is frozen too


def _load_training_state(student, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    frozen = any(not p.requires_grad for p in student.parameters())  # then the checkpoint holds the rest only
    set_model_state_dict(student, state["model"], options=_state_options(strict=not frozen))
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=_state_options())


def _save_pretrained(student, weights: dict | None, directory: Path) -> None:
    """``save_pretrained`` of the student; of a fresh model holding the gathered ``weights`` if it is sharded;
    a LoRA student's merged model, with its adapter under ``adapter/``."""
    if lora.is_lora(student):
        lora.save(student, directory)
        return
    if weights is not None:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_config(student.config)
        plain.load_state_dict(weights)
        student = plain
    student.save_pretrained(directory)


def _save_checkpoint(run_dir: RunDir, step: int, student, optimizer, streams, algorithm, distributed: bool) -> Path:
    rng = _rng_state()
    if distributed:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = _checkpoint_model_state(student)
    optimizer_state = get_optimizer_state_dict(student, optimizer, options=_state_options(cpu_offload=True))
    state = {"step": step, "model": model_state, "optimizer": optimizer_state,
             "data": streams.state_dict(), "algorithm": algorithm.state_dict(), "rng": rng}
    path = run_dir.save_checkpoint(step, lambda tmp: torch.save(state, tmp / "state.pt"))
    if distributed:
        torch.distributed.barrier()
    return path


def _all_reduce(x: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x
