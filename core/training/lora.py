"""LoRA students through peft: the student's decoder learns low-rank adapters, the rest stays frozen.

::

    student:
      path: /models/Qwen2.5-1.5B-Instruct
      lora: {r: 16, alpha: 32, dropout: 0.05}       # target_modules: Qwen's seven linear layers by default

``r``, ``alpha``, ``dropout`` and ``target_modules`` are peft's ``LoraConfig``
fields (``lora_alpha``, ``lora_dropout``); ``target_modules`` takes peft's forms (a
list of names, a regular expression, ``all-linear``), each checked against the
student's module names before anything loads; ``train_head: true`` also trains the
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
import re
import warnings
from pathlib import Path

import torch

from distillzoo.errors import ConfigError, did_you_mean

#: Qwen2's linear layers: attention and MLP
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
KEYS = ("r", "alpha", "dropout", "target_modules", "train_head")


def check(spec, where: str, tied: bool | None, modules: dict[str, str] | None = None) -> dict:
    """The ``student.lora`` section as peft's settings, checked before any model loads.

    ``tied``: whether the student ties its lm_head to its input embeddings (None: unknown).
    ``modules``: the student's module names and class names (from its config on the meta
    device; None: unknown), which every target must name as peft matches it.
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
    targets = _targets(spec.get("target_modules"), where, tied, modules)
    train_head = spec.get("train_head", False)
    if not isinstance(train_head, bool):
        raise ConfigError(f"{where}.train_head: {train_head!r} must be true or false")
    if train_head and tied:
        raise ConfigError(f"{where}.train_head: the student ties its lm_head to its input embeddings; training a "
                          "copy of the head would untie them in the merged model. Leave the head frozen, or train "
                          "the student in full")
    return {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "target_modules": targets,
            "modules_to_save": ["lm_head"] if train_head else None}


#: module classes peft can put a LoRA adapter on
ADAPTABLE = ("Linear", "Embedding", "Conv1D", "Conv2d", "Conv1d")


def _targets(raw, where: str, tied: bool | None, modules: dict[str, str] | None):
    """``target_modules`` in peft's forms: a list of names (a module is adapted when its name is one of them or
    ends with ``.`` + one), a regex string (``re.fullmatch`` on the whole name), or ``all-linear``. Each must
    adapt a module the student has; none may be the lm_head, whose weight the fused losses read directly."""
    key = f"{where}.target_modules"
    head_readers = {"lm_head"} | ({"embed_tokens"} if tied else set())
    if isinstance(raw, str):
        if raw == "all-linear":
            return raw  # peft picks the linear layers and leaves the output layer out
        try:
            pattern = re.compile(raw)
        except re.error as e:
            raise ConfigError(f"{key}: {raw!r} is neither a list of module names, 'all-linear', nor a valid regular "
                              f"expression ({e})") from None
        if modules is not None:
            matched = [name for name in modules if pattern.fullmatch(name)]
            if not matched:
                raise ConfigError(f"{key}: the regular expression {raw!r} matches none of the student's module names "
                                  f"(peft matches it against whole names such as {_example(modules)!r})")
            _refuse_head(key, [n.rpartition(".")[2] for n in matched], head_readers)
            _adaptable(key, matched, modules)
        return raw
    targets = list(raw or DEFAULT_TARGETS)
    if not all(isinstance(t, str) and t for t in targets):
        raise ConfigError(f"{key}: {targets!r} must be module names (q_proj, v_proj, ...), a regular expression or "
                          "'all-linear'")
    _refuse_head(key, targets, head_readers)
    if modules is not None:
        leaves = sorted({name.rpartition(".")[2] for name in modules if name})
        for target in targets:
            matched = [name for name in modules if name == target or name.endswith("." + target)]
            if not matched:
                raise ConfigError(f"{key}: the student has no module named {target!r}, so it would get no adapter. "
                                  f"Its module names end in: {', '.join(leaves)}." + did_you_mean(target, leaves))
            _adaptable(key, matched, modules)
    return targets


def _refuse_head(key: str, names, head_readers: set[str]) -> None:
    read = sorted(set(names) & head_readers)
    if read:
        raise ConfigError(f"{key}: {read[0]!r} is the lm_head"
                          + (" (tied to the input embeddings)" if read[0] == "embed_tokens" else "")
                          + ", whose weight the fused losses read directly, so its adapter would be ignored; train "
                            "the head in full with train_head: true, or leave it out")


def _adaptable(key: str, matched: list[str], modules: dict[str, str]) -> None:
    bad = [name for name in matched if modules[name] not in ADAPTABLE]
    if bad:
        raise ConfigError(f"{key}: {bad[0]!r} is a {modules[bad[0]]}, which peft cannot adapt; name its linear "
                          "layers (q_proj, v_proj, ...)")


def _example(modules: dict[str, str]) -> str:
    return next((name for name, kind in modules.items() if kind == "Linear"), next(iter(modules), ""))


def module_names(model) -> dict[str, str] | None:
    """``{module name: class name}`` of a model (built on the meta device), as peft sees them; None for none."""
    if model is None:
        return None
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def apply(model, settings: dict, seed: int):
    """``model`` with LoRA adapters (peft), initialised from a generator seeded by ``seed``."""
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)  # the adapters' init: a function of the seed, not of the RNG's history
        # peft reads transformers' deprecated alias itself: nothing the user's run or config can change
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def save(model, directory: Path) -> None:
    """``directory``: the merged model (``save_pretrained``); ``directory/adapter``: the adapter alone."""
    model.save_pretrained(directory / "adapter")
    merged = copy.deepcopy(model).merge_and_unload()  # the run's model keeps its adapters
    merged.save_pretrained(directory)
