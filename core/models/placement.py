"""A model bigger than one device, for inference: its decoder layers spread over GPUs, then CPU memory, then disk.

A 72B teacher in bf16 (about 144 GB) fits on no single GPU. For the commands that
only run the teacher forward (``cache-teacher``, ``generate``, ``score``,
``reference-cache``) :func:`device_map` places it within memory budgets::

    max_memory: {gpu: 70GiB, cpu: 200GiB}    # per GPU this rank owns, and CPU RAM; the rest on disk

The decoder layers fill this rank's GPUs in order, then the CPU budget, then disk
(transformers' ``device_map`` dispatch through accelerate moves each layer's
weights to the first GPU, or the CPU without one, when it runs). The embeddings,
the final norm and the lm_head are never offloaded: they stay whole on the first
device, because distillzoo's fused losses read the lm_head weight directly rather
than through its forward. Training shards the teacher with FSDP2 instead
(``train.parallel: fsdp``; the training page of the docs).
"""

from __future__ import annotations

import re
import tempfile
import weakref

import torch

from distillzoo.errors import ConfigError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BUDGET_KEYS = ("gpu", "cpu")


def size_in_bytes(value, where: str) -> int:
    """``70GiB``, ``500MB``, ``1.5e9`` or an int, as bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"{where}: {value!r} is not a size (70GiB, 500MB, or bytes)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_budgets(max_memory, where: str) -> dict[str, int]:
    """``{gpu: bytes, cpu: bytes}`` from a ``max_memory`` mapping (or ``gpu=70GiB,cpu=200GiB`` text)."""
    if isinstance(max_memory, str):
        items = [item.partition("=") for item in max_memory.split(",") if item.strip()]
        if any(not sep for _, sep, _ in items):
            raise ConfigError(f"{where}: {max_memory!r}: give KEY=SIZE pairs, e.g. gpu=70GiB,cpu=200GiB")
        max_memory = {key.strip(): value for key, _, value in items}
    if not isinstance(max_memory, dict) or not max_memory or set(max_memory) - set(BUDGET_KEYS):
        raise ConfigError(f"{where}: {max_memory!r}: budgets are keyed {list(BUDGET_KEYS)} (per GPU this rank owns, "
                          "and CPU memory; what does not fit goes to disk)")
    return {key: size_in_bytes(value, f"{where}.{key}") for key, value in max_memory.items()}


def _sizes(model, dtype: torch.dtype | None) -> tuple[str, list[str], dict[str, int]]:
    """``(decoder name, layer names, {module name: bytes})`` of a model built on the meta device: the decoder
    layers, and the resident modules (everything else: embeddings, final norm, lm_head), tied weights once."""
    decoder = model.get_decoder()
    decoder_name = next(name for name, module in model.named_modules() if module is decoder)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError(f"{type(model).__name__} has no decoder.layers to place; load it whole instead")
    prefix = f"{decoder_name}." if decoder_name else ""
    layer_names = [f"{prefix}layers.{i}" for i in range(len(layers))]
    seen: set[int] = set()

    def size(module) -> int:
        total = 0
        for p in list(module.parameters()) + list(module.buffers()):
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel() * (dtype or p.dtype).itemsize
        return total

    sizes = {}
    for name, child in model.named_children():
        if child is decoder:
            for sub, grandchild in decoder.named_children():
                if sub != "layers":
                    sizes[f"{prefix}{sub}"] = size(grandchild)
        else:
            sizes[name] = size(child)
    resident = dict(sizes)
    for name, layer in zip(layer_names, layers):
        sizes[name] = size(layer)
    return decoder_name, layer_names, {**resident, **{n: sizes[n] for n in layer_names}}


def device_map(path: str, budgets: dict[str, int], gpus: list[int], dtype: torch.dtype | None = None) -> dict:
    """``{module name: gpu index | "cpu" | "disk"}`` for the checkpoint at ``path``: the resident modules on the
    first device, the decoder layers in order over ``gpus``, the CPU and disk within ``budgets``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    dtype = dtype or getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    _, layer_names, sizes = _sizes(model, dtype)
    devices = [(g, budgets.get("gpu", 0)) for g in gpus] + [("cpu", budgets.get("cpu", 0))]
    free = dict(devices)
    first = devices[0][0]
    placed: dict[str, object] = {}
    resident = sum(sizes[name] for name in sizes if name not in layer_names)
    if resident > free[first]:
        raise ConfigError(f"max_memory: the embeddings, final norm and lm_head ({resident / 2**30:.2f} GiB) stay whole on "
                          f"{'GPU ' + str(first) if first != 'cpu' else 'the CPU'}, whose budget is "
                          f"{free[first] / 2**30:.2f} GiB; raise it")
    for name in sizes:
        if name not in layer_names:
            placed[name] = first
    free[first] -= resident
    order = iter(devices)
    device, _ = next(order)
    for name in layer_names:
        while device != "disk" and sizes[name] > free[device]:
            device = next(order, ("disk", 0))[0]
        placed[name] = device
        if device != "disk":
            free[device] -= sizes[name]
    return placed


def load_placed(path: str, budgets: dict[str, int], gpus: list[int], dtype: torch.dtype | None = None):
    """The model at ``path`` dispatched over ``gpus``, the CPU and disk by :func:`device_map` (eval mode)."""
    try:
        import accelerate  # noqa: F401  (transformers dispatches a device_map through it)
    except ImportError:
        raise ConfigError('max_memory places a model with accelerate: pip install "distillzoo[offload]"') from None
    from transformers import AutoModelForCausalLM

    placement = device_map(path, budgets, gpus, dtype)
    offload = tempfile.TemporaryDirectory(prefix="distillzoo-offload-") if "disk" in placement.values() else None
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, device_map=placement,
                                                 offload_folder=offload.name if offload else None)
    if offload is not None:
        weakref.finalize(model, offload.cleanup)
    return model.eval()
