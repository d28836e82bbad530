"""What a checkpoint holds and how the student is saved: state dicts (gathered under FSDP2), RNG states, the
final ``save_pretrained``.

A checkpoint keeps the student's trainable parameters (all of them, or a LoRA
student's adapters), the optimiser, the data order, the algorithm's state and every
rank's RNG states, so ``resume: auto`` reaches the weights an uninterrupted run
would have. The frozen rest of a LoRA student is rebuilt from the config on resume.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from distillzoo.models.causal_lm import without_transformers_bars
from distillzoo.training import lora
from distillzoo.training.run_dir import RunDir


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def full_model_state(student) -> dict:
    """The student's whole state dict on rank 0 (gathered from the shards under FSDP2), on the CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(student, options=_options(cpu_offload=True))


def checkpoint_model_state(student) -> dict:
    """What a checkpoint keeps of the student: its trainable parameters (all of them, or a LoRA student's
    adapters), gathered on rank 0 and on the CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(student, options=_options(cpu_offload=True, ignore_frozen_params=True))
    frozen = {name for name, p in student.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {key: value for key, value in state.items() if key not in frozen}  # a tied head is frozen too


def load_training_state(student, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    frozen = any(not p.requires_grad for p in student.parameters())  # then the checkpoint holds the rest only
    set_model_state_dict(student, state["model"], options=_options(strict=not frozen))
    set_optimizer_state_dict(student, optimizer, state["optimizer"], options=_options())


def save_pretrained(student, weights: dict | None, directory: Path) -> None:
    """``save_pretrained`` of the student; of a fresh model holding the gathered ``weights`` if it is sharded;
    a LoRA student's merged model, with its adapter under ``adapter/``. Without transformers' progress bars
    ("Writing model shards"): the command's own bar, or none, says what runs."""
    with without_transformers_bars():
        if lora.is_lora(student):
            lora.save(student, directory)
            return
        if weights is not None:
            from transformers import AutoModelForCausalLM

            plain = AutoModelForCausalLM.from_config(student.config)
            plain.load_state_dict(weights)
            student = plain
        student.save_pretrained(directory)


def save_checkpoint(run_dir: RunDir, step: int, student, optimizer, streams, algorithm, distributed: bool) -> Path:
    """Write checkpoint ``step`` (rank 0, atomically); every rank's RNG state is gathered into it."""
    rng = rng_state()
    if distributed:
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_state = checkpoint_model_state(student)
    optimizer_state = get_optimizer_state_dict(student, optimizer, options=_options(cpu_offload=True))
    state = {"step": step, "model": model_state, "optimizer": optimizer_state,
             "data": streams.state_dict(), "algorithm": algorithm.state_dict(), "rng": rng}
    path = run_dir.save_checkpoint(step, lambda tmp: torch.save(state, tmp / "state.pt"))
    if distributed:
        torch.distributed.barrier()
    return path


def restore(checkpoint_state: dict, student, optimizer, streams, algorithm, rank: int) -> int:
    """Load a checkpoint's state into the run; returns the step it was taken at."""
    load_training_state(student, optimizer, checkpoint_state)
    streams.load_state_dict(checkpoint_state["data"])
    algorithm.load_state_dict(checkpoint_state.get("algorithm") or {})
    rng = checkpoint_state["rng"]
    set_rng_state(rng[rank] if isinstance(rng, list) else rng)
    return checkpoint_state["step"]
