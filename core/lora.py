"""LoRA students through peft: the student's decoder learns low-rank adapters, the rest stays frozen.

::

    student:
      path: /models/Qwen2.5-1.5B-Instruct
      lora: {r: 16, alpha: 32, dropout: 0.05}       # target_modules: Qwen's seven linear layers by default

``r``, ``alpha``, ``dropout`` and ``target_modules`` are peft's ``LoraConfig``
fields (``lora_alpha``, ``lora_dropout``); ``train_head: true`` also trains the
lm_head in full (peft's ``modules_to_save``). The adapters' initial values are
drawn from a generator seeded by the run's seed, so two runs, or a run and its
resume, start from the same adapters.

The fused losses read the lm_head weight directly, so an adapter on the lm_head
(or on tied input embeddings, which are the lm_head) would be ignored by them:
such targets are refused. Checkpoints hold the trainable parameters only (adapters,
and the head with ``train_head``) and their optimiser state; ``final/`` holds the
merged model, which ``AutoModelForCausalLM`` loads like any other, and
``final/adapter`` the adapter, which peft's ``PeftModel.from_pretrained`` puts back
on the base model. Needs ``pip install "distillzoo[lora]"``.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from .errors import ConfigError

#: Qwen2's linear layers: attention and MLP
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEYS = ("r", "alpha", "dropout", "target_modules", "train_head")


def check(spec, where: str, tied: bool | None) -> dict:
    """The ``student.lora`` section as peft's settings, checked before any model loads.

    ``tied``: whether the student ties its lm_head to its input embeddings (None: unknown).
    """
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f'{where}: LoRA students need peft: pip install "distillzoo[lora]"')
    spec = dict(spec)
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; lora takes {list(KEYS)}")
    r, alpha, dropout = spec.get("r", 8), spec.get("alpha", 16), spec.get("dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"{where}.r: {r!r} must be an integer >= 1 (the adapters' rank)")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"{where}.alpha: {alpha!r} must be a number > 0 (the adapters' scale is alpha / r)")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"{where}.dropout: {dropout!r} must be in [0, 1)")
    targets = list(spec.get("target_modules") or DEFAULT_TARGETS)
    if not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{where}.target_modules: {targets!r} must be module names (q_proj, v_proj, ...)")
    head_readers = {"lm_head"} | ({"embed_tokens"} if tied else set())
    read = sorted(set(targets) & head_readers)
    if read:
        raise ConfigError(f"{where}.target_modules: {read[0]!r} is the lm_head"
                          + (" (tied to the input embeddings)" if read[0] == "embed_tokens" else "")
                          + ", whose weight the fused losses read directly, so its adapter would be ignored; train "
                            "the head in full with train_head: true, or leave it out")
    train_head = spec.get("train_head", False)
    if not isinstance(train_head, bool):
        raise ConfigError(f"{where}.train_head: {train_head!r} must be true or false")
    if train_head and tied:
        raise ConfigError(f"{where}.train_head: the student ties its lm_head to its input embeddings; training a "
                          "copy of the head would untie them in the merged model. Leave the head frozen, or train "
                          "the student in full")
    return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "target_modules": targets,
            "modules_to_save": ["lm_head"] if train_head else None}


def apply(model, settings: dict, seed: int):
    """``model`` with LoRA adapters (peft), initialised from a generator seeded by ``seed``."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):  # the adapters' init: a function of the seed, not of the RNG's history
        torch.manual_seed(seed)
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def save(model, directory: Path) -> None:
    """``directory``: the merged model (``save_pretrained``); ``directory/adapter``: the adapter alone."""
    model.save_pretrained(directory / "adapter")
    merged = copy.deepcopy(model).merge_and_unload()  # the run's model keeps its adapters
    merged.save_pretrained(directory)
