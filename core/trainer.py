"""The training loop: distil a teacher into a student with the objective a config names.

Read top to bottom: validate the config (before any model is loaded), data
streams, models, optimiser and schedule, resume, then the loop. Each optimiser
step takes ``train.batch_size`` examples (split over ranks and micro-batches);
the loss is the objective summed over valid tokens divided by the global count
of valid tokens of the step, so accumulation and ranks weigh every token alike.
The student's logits are never materialised: ``objective.from_hidden`` gets the
final hidden states and lm_head weights of both models, inside the forward of
one module (:class:`_Step`) that holds student and frozen teacher.

Under ``torchrun`` that module is wrapped in DDP (``train.parallel: ddp``; the
teacher is neither broadcast nor reduced) or sharded with FSDP2
(``train.parallel: fsdp``: ``fully_shard`` on every decoder layer of both
models, the rest in the root unit). ``train.precision`` picks bf16 autocast
(the default on CUDA) or fp32 (the default on CPU).

Checkpoints (``train.checkpoint_every``) hold the weights, the optimiser,
schedule, data order and RNG states; they are written under a temporary name and
renamed, and ``resume: auto`` continues from the newest one, giving the weights
an uninterrupted run would have reached. The final student is saved with
``save_pretrained`` under ``output_dir/final``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import write_dir_atomically, write_text_atomically
from .causal_lm import final_hidden, lm_head_weight, load_causal_lm, tiny_qwen2
from .config import build_objective, objective_terms
from .data import IGNORE_INDEX, data_format
from .errors import ConfigError, DataError, DistillzooError
from .manager import objective as make_objective
from .shards import ConversationDataset, TokenShards, collate_sft
from .streams import MixedStreams, Stream

CHECKPOINT_PREFIX = "step-"
PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")


# ---------------------------------------------------------------------------- config checks (no model loaded)
def validate(cfg: DictConfig, where: str = "<config>"):
    """Everything that can be checked without loading a model: names, paths, sizes.

    Returns the opened teacher cache when the config names one (else None), so it is read once.
    """
    terms = objective_terms(cfg)
    from .manager import objective_spec

    for term in terms:
        kind = objective_spec(term.name).kind
        if kind != "logit":
            raise ConfigError(f"{where}: {term.path}.name: '{term.name}' is a {kind} objective; "
                              "distillzoo train runs logit-level objectives (use preference_step for dpo/simpo/dpkd)")
    if cfg.student is None or (cfg.student.path is None) == (cfg.student.tiny is None):
        raise ConfigError(f"{where}: student: give exactly one of student.path (a local model directory) or student.tiny")
    t = cfg.train
    if not 0 <= t.on_policy <= 1:
        raise ConfigError(f"{where}: train.on_policy: {t.on_policy} is not a probability in [0, 1]")
    if t.on_policy:
        if cfg.teacher is not None and cfg.teacher.cache is not None:
            raise ConfigError(f"{where}: train.on_policy: a teacher cache covers the data's responses only; the "
                              "student's own samples need a live teacher (teacher.path or teacher.tiny)")
        if t.parallel == "fsdp":
            raise ConfigError(f"{where}: train.on_policy: sampling from an FSDP2-sharded student is not supported "
                              "yet; use train.parallel=ddp")
        try:
            _on_policy_sampling(t, cfg.seed, 0)
        except DistillzooError as e:
            raise ConfigError(f"{where}: train.on_policy_*: {e}") from None
    objective = build_objective(cfg)
    teacher = cfg.teacher
    sources = [] if teacher is None else [key for key in ("path", "tiny", "cache") if teacher[key] is not None]
    if objective.needs_teacher and len(sources) != 1:
        raise ConfigError(f"{where}: teacher: the objective needs a teacher; give one of teacher.path, teacher.tiny "
                          f"or teacher.cache{f' (got {sources})' if sources else ''}")
    cache = _check_cache(cfg, objective, where) if teacher is not None and teacher.cache is not None else None
    if cfg.data is None or not cfg.data.streams:
        raise ConfigError(f"{where}: data.streams: give at least one stream {{name, path, format, repeat|weight}}")
    streams = list(enumerate(cfg.data.streams)) + ([("eval", cfg.data.eval)] if cfg.data.eval is not None else [])
    for i, stream in streams:
        key = "data.eval" if i == "eval" else f"data.streams[{i}]"
        path = Path(stream.path)
        if path.is_dir():
            if not (path / "meta.json").is_file():
                raise ConfigError(f"{where}: {key}.path: {path} is a directory but not a prepared one (no meta.json)")
        elif path.is_file():
            if stream.format is None:
                raise ConfigError(f"{where}: {key}.format: {path} is JSONL; name its format (dolly, alpaca, chat, ...)")
            try:
                data_format(stream.format)
            except DistillzooError as e:
                raise ConfigError(f"{where}: {key}.format: {e}") from None
        else:
            raise ConfigError(f"{where}: {key}.path: {str(path)!r} does not exist")
        if i != "eval" and stream.repeat is None and stream.weight is None:
            raise ConfigError(f"{where}: {key}: give a repeat count or a weight")
    t = cfg.train
    if t.steps < 1 or t.batch_size < 1:
        raise ConfigError(f"{where}: train.steps and train.batch_size must be >= 1")
    for key, choices in (("precision", PRECISIONS), ("parallel", PARALLEL)):
        if t[key] not in choices:
            raise ConfigError(f"{where}: train.{key}: {t[key]!r} is not one of {list(choices)}")
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"{where}: resume: {cfg.resume!r} is not one of ['auto', 'never']")
    if cfg.output_dir is None:
        raise ConfigError(f"{where}: output_dir: give a directory for checkpoints, metrics and the final student")
    return cache


# ---------------------------------------------------------------------------- pieces
def _dataset(stream, tokenizer, data):
    path = Path(stream.path)
    if path.is_dir():
        return TokenShards(path)
    return ConversationDataset(path, stream.format, tokenizer, max_length=data.max_length, system=data.system)


def model_from_config(mcfg, what: str):
    """The model a ``student`` / ``teacher`` section names: a local directory, or a tiny Qwen2 from its config."""
    if mcfg.path is not None:
        return load_causal_lm(mcfg.path)
    kwargs = {"tie_word_embeddings": True, **OmegaConf.to_container(mcfg.tiny, resolve=True)}
    try:
        return tiny_qwen2(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{what}.tiny: {e}") from None


def require_model(cfg, role: str, needed_by: str, where: str) -> None:
    """A ConfigError unless ``cfg[role]`` names a model one way (a path or a tiny config)."""
    m = cfg[role]
    if m is None or (m.path is None) == (m.tiny is None):
        raise ConfigError(f"{where}: {role}: {needed_by} needs the {role}; give {role}.path or {role}.tiny")


def _given(mcfg) -> bool:
    return mcfg is not None and (mcfg.path is not None or mcfg.tiny is not None)


def _check_cache(cfg, objective, where: str):
    """The teacher cache, refused unless its manifest agrees with the config (k, tokenizer, temperature)."""
    from .base import Mixture
    from .teacher_cache import TeacherCache
    from .tokenizer import load_tokenizer

    try:
        cache = TeacherCache(cfg.teacher.cache)
    except DistillzooError as e:
        raise ConfigError(f"{where}: teacher.cache: {e}") from None
    terms = objective.terms if isinstance(objective, Mixture) else [objective]
    dense_only = [t.name for t in terms if t.needs_teacher and not t.accepts_sparse_teacher]
    if dense_only:
        raise ConfigError(f"{where}: teacher.cache: {', '.join(dense_only)} cannot take a top-k (sparse) teacher; a "
                          "cache works with the objectives that accept one (fkl, rkl, jsd, skl, srkl, tvd)")
    temperatures = {float(t.temperature) for t in terms if getattr(t, "needs_teacher", False)}
    if len(temperatures) > 1:
        raise ConfigError(f"{where}: objectives: a teacher cache holds one temperature; the terms use {sorted(temperatures)}")
    tokenizer = load_tokenizer(cfg.data.tokenizer if cfg.data is not None else None).name
    cache.check(f"{where}: teacher.cache", k=cfg.teacher.top_k, tokenizer=tokenizer,
                temperature=temperatures.pop() if temperatures else None)
    return cache


def lr_at(step: int, t) -> float:
    """Linear warmup to train.lr, then cosine decay to min_lr_ratio * lr at train.steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _sum_objective(cfg):
    """The config's objective with reduction 'sum' on every term (the loop normalises by global tokens)."""
    from .base import Mixture

    terms = objective_terms(cfg)
    built = [(t.weight, make_objective(t.name, **{**t.params, "reduction": "sum"})) for t in terms]
    return built[0][1] if cfg.get("objective") is not None else Mixture(built)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted((output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")) if output_dir.exists() else []
    found = [p for p in found if (p / "state.pt").is_file()]
    return found[-1] if found else None


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float


# ---------------------------------------------------------------------------- the loop
def train(cfg: DictConfig, where: str = "<config>") -> TrainResult:
    cache = validate(cfg, where)
    from .tokenizer import load_tokenizer

    t = cfg.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if t.batch_size % world:
        raise ConfigError(f"{where}: train.batch_size={t.batch_size} is not divisible by the {world} ranks")
    per_rank = t.batch_size // world
    micro = t.micro_batch_size or per_rank
    output_dir = Path(cfg.output_dir)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    streams = MixedStreams([Stream(s.name, _dataset(s, tokenizer, cfg.data), s.repeat, s.weight)
                            for s in cfg.data.streams], seed=cfg.seed, samples_per_epoch=cfg.data.samples_per_epoch,
                           rank=rank, world_size=world)
    eval_set = _dataset(cfg.data.eval, tokenizer, cfg.data) if cfg.data.eval is not None else None

    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    student = model_from_config(cfg.student, "student").to(device).train()
    teacher = None
    objective = _sum_objective(cfg)
    if cache is not None:
        cache.check(f"{where}: teacher.cache", vocab_size=lm_head_weight(student).shape[0])
    elif objective.needs_teacher or (eval_set is not None and _given(cfg.teacher)):  # eval reports the KL too
        teacher = model_from_config(cfg.teacher, "teacher").to(device).eval().requires_grad_(False)
    step_of = _Step(student, teacher, objective, bf16)
    fsdp = distributed and t.parallel == "fsdp"
    if fsdp:
        step_of = _fully_shard(step_of)
    elif distributed:
        if teacher is not None:  # frozen and identical on every rank: neither broadcast nor reduced
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                step_of, [f"teacher.{name}" for name, _ in [*teacher.named_parameters(), *teacher.named_buffers()]])
        step_of = torch.nn.parallel.DistributedDataParallel(step_of)
    optimizer = torch.optim.AdamW(student.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=not fsdp)
    step = 0
    checkpoint = latest_checkpoint(output_dir) if cfg.resume == "auto" else None
    if checkpoint is not None:
        state = torch.load(checkpoint / "state.pt", weights_only=False, map_location="cpu")
        _load_training_state(student, optimizer, state)
        streams.load_state_dict(state["data"])
        _set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])
        step = state["step"]
        if rank == 0:
            _truncate_metrics(output_dir / "metrics.jsonl", step)
            print(f"resumed from {checkpoint} at step {step}", file=sys.stderr)
    elif rank == 0 and cfg.resume == "never" and (output_dir / "metrics.jsonl").exists():
        (output_dir / "metrics.jsonl").unlink()

    bar = None
    if t.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="distillzoo train", dynamic_ncols=True)
    loss_value = float("nan")
    while step < t.steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        examples = streams.take(per_rank)
        if t.on_policy and _on_policy_step(cfg.seed, step, t.on_policy):
            examples = student_samples(student, tokenizer, examples, _on_policy_sampling(t, cfg.seed, step))
        chunks = _chunks(examples, micro)
        batches = [{k: v.to(device) for k, v in collate_sft(chunk, tokenizer.pad_id).items()} for chunk in chunks]
        n_local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_global = _all_reduce(torch.tensor(float(n_local)), distributed)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for i, b in enumerate(batches):
            last = i == len(batches) - 1
            with _gradient_sync(step_of, last, distributed):
                targets = b["labels"][:, 1:]
                sparse = None if cache is None else cache.sparse_teacher(_sample_ids(chunks[i], where), targets)
                part = step_of(b["input_ids"], b["attention_mask"], targets, sparse=sparse)
                (part * (world / max(float(n_global), 1.0))).backward()
            loss_sum += part.detach().double().cpu()
        norm = _full(torch.nn.utils.clip_grad_norm_(student.parameters(), t.max_grad_norm or float("inf")))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_value = float(_all_reduce(loss_sum, distributed)) / max(float(n_global), 1.0)
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": loss_value, "lr": lr_at(step - 1, t), "grad_norm": float(norm),
                  "tokens": int(n_global), "tokens_per_s": float(n_global) / max(elapsed, 1e-9)}
        if t.eval_every and eval_set is not None and (step % t.eval_every == 0 or step == t.steps):
            record.update(evaluate(step_of, eval_set, tokenizer.pad_id, micro, device))
        if rank == 0:
            if t.log_every and (step % t.log_every == 0 or step == t.steps or "eval/nll" in record):
                _append_jsonl(output_dir / "metrics.jsonl", record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
            _save_checkpoint(output_dir, step, student, optimizer, streams, distributed, rank)
    if bar is not None:
        bar.close()
    weights = _full_model_state(student) if fsdp else None
    if rank == 0:
        write_dir_atomically(output_dir / "final", lambda tmp: _save_pretrained(student, weights, tmp))
    if distributed:
        torch.distributed.barrier()
    return TrainResult(output_dir, step, loss_value)


class _Step(torch.nn.Module):
    """Student and frozen teacher as one module whose forward is the loss, so that DDP and FSDP2 see it.

    ``forward`` returns the objective summed over the valid tokens of a batch,
    from the final hidden states and lm_head weights (no ``[tokens, V]`` logits).
    Under FSDP2 the lm_head weights are whole only inside this forward, which is
    why the loss is computed here and not by the caller. With ``bf16`` the
    decoders run under autocast and the loss head takes bf16 operands
    (accumulating in fp32); the fp32 weights stay the master copy.
    """

    def __init__(self, student, teacher, objective, bf16: bool) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.objective = objective
        self.bf16 = bf16

    def _hidden(self, model, input_ids, attention_mask):
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return final_hidden(model, input_ids, attention_mask)[:, :-1]

    def _cast(self, x):
        return x.to(torch.bfloat16) if self.bf16 else x

    def forward(self, input_ids, attention_mask, targets, evaluate: bool = False, sparse=None):
        """``sparse``: a SparseTeacher from a teacher cache, used in place of the teacher model."""
        hs = self._cast(self._hidden(self.student, input_ids, attention_mask))
        ws = self._cast(lm_head_weight(self.student))
        ht = wt = None
        if sparse is not None:
            ht = sparse
        elif self.teacher is not None and (evaluate or self.objective.needs_teacher):
            with torch.no_grad():
                ht = self._cast(self._hidden(self.teacher, input_ids, attention_mask))
                wt = self._cast(lm_head_weight(self.teacher))
        if not evaluate:
            return self.objective.from_hidden(hs, ws, ht, wt, targets)
        from .kernels import token_logprobs

        nll = -token_logprobs(hs, ws, targets).double().sum()
        if ht is None:
            return torch.stack([nll, torch.zeros_like(nll)])
        kl = make_objective("fkl", reduction="sum").from_hidden(hs, ws, ht, wt, targets)
        return torch.stack([nll, kl.double()])


def _fully_shard(step_of: _Step):
    """FSDP2: each decoder layer of student and teacher is a unit; the rest (embeddings, norms, heads) the root."""
    from torch.distributed.fsdp import fully_shard

    for model in (step_of.student, step_of.teacher):
        if model is None:
            continue
        layers = getattr(model.get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError(f"train.parallel=fsdp: {type(model).__name__} has no decoder.layers to shard")
        for layer in layers:
            fully_shard(layer)
    return fully_shard(step_of)


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


@torch.no_grad()
def evaluate(step_of, dataset, pad_id: int, batch_size: int, device) -> dict:
    """Held-out student NLL per response token and, with a teacher, KL(teacher || student) per token."""
    module = step_of.module if isinstance(step_of, torch.nn.parallel.DistributedDataParallel) else step_of
    was_training = module.student.training
    module.student.eval()
    sums = torch.zeros(2, dtype=torch.float64)
    tokens = 0
    for start in range(0, len(dataset), batch_size):
        batch = collate_sft([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
        targets = batch["labels"][:, 1:].to(device)
        sums += step_of(batch["input_ids"].to(device), batch["attention_mask"].to(device), targets,
                        evaluate=True).cpu()
        tokens += int((targets != IGNORE_INDEX).sum())
    module.student.train(was_training)
    out = {"eval/nll": float(sums[0]) / max(tokens, 1)}
    if module.teacher is not None:
        out["eval/kl_teacher_student"] = float(sums[1]) / max(tokens, 1)
    return out


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _full_model_state(student) -> dict:
    """The student's whole state dict on rank 0 (gathered from the shards under FSDP2), on the CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(student, options=_state_options(cpu_offload=True))


def _load_training_state(student, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(student, state["model"], options=_state_options())
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=_state_options())


def _save_pretrained(student, weights: dict | None, directory: Path) -> None:
    """``save_pretrained`` of the student; of a fresh model holding the gathered ``weights`` if it is sharded."""
    if weights is not None:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_config(student.config)
        plain.load_state_dict(weights)
        student = plain
    student.save_pretrained(directory)


def _save_checkpoint(output_dir: Path, step: int, student, optimizer, streams, distributed: bool, rank: int) -> None:
    rng = _rng_state()
    if distributed:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = _full_model_state(student)
    optimizer_state = get_optimizer_state_dict(student, optimizer, options=_state_options(cpu_offload=True))
    if rank == 0:
        state = {"step": step, "model": model_state, "optimizer": optimizer_state,
                 "data": streams.state_dict(), "rng": rng}
        write_dir_atomically(output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}",
                    lambda tmp: torch.save(state, tmp / "state.pt"))
        for old in sorted((output_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[:-2]:
            shutil.rmtree(old, ignore_errors=True)  # keep the two newest
    if distributed:
        torch.distributed.barrier()


def _on_policy_step(seed: int, step: int, probability: float) -> bool:
    """Whether step ``step`` trains on student samples: the same on every rank, and after a resume."""
    from .generation import sample_seed

    return torch.rand((), generator=torch.Generator().manual_seed(sample_seed(seed, f"on-policy:{step}"))) < probability


def _on_policy_sampling(t, seed: int, step: int):
    from .generation import Sampling

    return Sampling(t.on_policy_max_new_tokens, t.on_policy_temperature, seed=seed * 1_000_003 + step)


@torch.no_grad()
def student_samples(student, tokenizer, examples: list[dict], sampling) -> list[dict]:
    """The examples with their last scored reply replaced by the student's own sample (GKD's on-policy data).

    The prompt is everything before the last run of loss tokens; the sample is
    scored, with ``<|im_end|>`` when the student produced it. Each example samples
    from a generator seeded by the step's seed and its sample id (or position).
    """
    from .generation import decode

    prompts = []
    for ex in examples:
        mask = ex["loss_mask"].tolist()
        last = len(mask) - 1 - mask[::-1].index(True)
        start = last
        while start > 0 and mask[start - 1]:
            start -= 1
        prompts.append(ex["input_ids"][:start].tolist())
    ids = [str(ex.get("id", i)) for i, ex in enumerate(examples)]
    answers = decode(student, tokenizer, prompts, sampling, ids=ids, batch_size=len(examples))
    out = []
    for ex, prompt, (answer, finish) in zip(examples, prompts, answers):
        reply = answer + ([tokenizer.im_end_id] if finish == "stop" else [])  # never empty: max_new_tokens >= 1
        out.append({**ex, "input_ids": torch.tensor(prompt + reply, dtype=torch.int32),
                    "loss_mask": torch.tensor([False] * len(prompt) + [True] * len(reply))})
    return out


def _sample_ids(examples, where: str) -> list:
    ids = [ex.get("id") for ex in examples]
    if any(i is None for i in ids):
        raise DataError(f"{where}: teacher.cache: an example has no sample id (a data directory from an older "
                        "distillzoo prepare? prepare it again); the cache is read by id")
    return ids


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _all_reduce(x: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the resumed step (the killed run logged them; the rerun logs them again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step]
    write_text_atomically(path, "".join(line + "\n" for line in kept))
