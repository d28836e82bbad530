"""The training loop's collective pieces: FSDP2 sharding, DDP's ignored frozen models, gradient sync per
micro-batch, and all-reduced sums. In one process (``distributed`` False) each is a no-op."""

from __future__ import annotations

import atexit
import contextlib
import os

import torch

from distillzoo.errors import ConfigError


def start(distributed: bool) -> None:
    """Join the process group torchrun describes (once per process); whoever starts it ends it at exit, as
    ``distillzoo.teacher.launch.Launch`` does: a gloo group left to the interpreter's teardown can abort the
    process after a finished run ("terminate called without an active exception")."""
    if distributed and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(torch.distributed.destroy_process_group)


def device() -> torch.device:
    """This rank's GPU, or the CPU without CUDA."""
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")


def wrap(models, distributed: bool, fsdp: bool):
    """What the loop calls: ``models`` itself, in DDP (teacher and reference neither broadcast nor reduced),
    or sharded with FSDP2."""
    if fsdp:
        return fully_shard(models)
    if distributed:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(models, models.frozen())
        return torch.nn.parallel.DistributedDataParallel(models)
    return models


def fully_shard(models):
    """FSDP2: each decoder layer of every model is a unit; the rest (embeddings, norms, heads) the root."""
    from torch.distributed.fsdp import fully_shard as shard

    for model in (models.student, models.teacher, models.reference):
        if model is None:
            continue
        layers = getattr(model.get_decoder(), "layers", None)
        if layers is None:
            raise ConfigError(f"train.parallel=fsdp: {type(model).__name__} has no decoder.layers to shard")
        for layer in layers:
            shard(layer)
    return shard(models)


def gradient_sync(step_of, last: bool, distributed: bool):
    """Reduce gradients only on a step's last micro-batch (DDP no_sync, FSDP2 set_requires_gradient_sync)."""
    if hasattr(step_of, "set_requires_gradient_sync"):
        step_of.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if distributed and not last:
        return step_of.no_sync()
    return contextlib.nullcontext()


def full(x):
    """A DTensor (FSDP2) as a plain tensor; anything else as is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def all_reduce(x: torch.Tensor, distributed: bool) -> torch.Tensor:
    if distributed:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def global_means(sums: dict, count: float, distributed: bool) -> dict[str, float]:
    """Sums over micro-batches, all-reduced over ranks (one call), divided by the step's global count."""
    keys = sorted(sums)
    total = all_reduce(torch.stack([sums[k].reshape(()) for k in keys]), distributed)
    return {k: float(v) / max(count, 1.0) for k, v in zip(keys, total.tolist())}
