"""Causal LMs as distillzoo sees them: final hidden states, the lm_head, response log-probs.

:func:`sequence_logps` sums the log-probs of a batch of responses under a
transformers causal LM without a ``[batch, seq, vocab]`` tensor: it runs the
model's decoder for the final hidden states and hands them with the lm_head
weight to :func:`distillzoo.kernels.token_logprobs`, which takes the vocab in
token chunks (Triton on CUDA). ``fused=False`` is the naive path (the model's
own logits, ``log_softmax``, gather) that tests and benchmarks compare with.

Labels follow the transformers convention: aligned with ``input_ids``, with
``ignore_index`` on the prompt and padding; the logits at position ``t`` score
``labels[t + 1]``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from distillzoo.errors import ConfigError, ParameterError, did_you_mean
from distillzoo.kernels import token_logprobs

_UNSUPPORTED_HEADS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def lm_head_weight(model) -> Tensor:
    """The ``[V, H]`` output projection of a transformers causal LM (tied or not), checked to be plain."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise ParameterError(f"{type(model).__name__} has no output embedding (lm_head) weight; distillzoo needs a "
                             "causal LM whose logits are hidden @ lm_head.weight.T")
    if getattr(head, "bias", None) is not None:
        raise ParameterError(f"{type(model).__name__}'s lm_head has a bias; the fused log-prob path assumes none")
    config = getattr(model, "config", None)
    for attr in _UNSUPPORTED_HEADS:
        value = getattr(config, attr, None)
        if value not in (None, 0, 1, 1.0):
            raise ParameterError(f"{type(model).__name__} scales or caps its logits (config.{attr}={value}); the "
                                 "fused path computes hidden @ lm_head.weight.T only. Use fused=False.")
    return head.weight


def final_hidden(model, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """``[B, T, H]`` hidden states after the decoder's final norm (what the lm_head reads)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if decoder is None:
        raise ParameterError(f"{type(model).__name__} exposes no decoder (get_decoder()); cannot take hidden states")
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


@dataclass
class SequenceLogps:
    """Per-row response log-probs and what the sequence objectives also need.

    ``logps``: ``[B]`` summed ``log pi(y)`` over response tokens (fp32; grad flows to
    the model). ``lengths``: ``[B]`` int64 response token counts. ``hidden``,
    ``targets`` (``[B, T-1, H]`` and ``[B, T-1]``, shifted so that row ``t`` scores
    ``targets[t]``) and the lm_head ``weight`` they were scored with are kept for
    token-level terms on the same forward pass (hidden and weight are None on the naive
    path); ``tokens`` holds the per-token log-probs (LD-DPO reweights them).
    """

    logps: Tensor
    lengths: Tensor
    hidden: Tensor | None = None
    targets: Tensor | None = None
    weight: Tensor | None = None
    #: ``[B, T-1]`` the per-token log-probs the sums add up (0 off the response), aligned with ``targets``
    tokens: Tensor | None = None


def _check(input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor) -> None:
    if input_ids.dim() != 2:
        raise ParameterError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, seq]")
    for name, t in (("attention_mask", attention_mask), ("labels", labels)):
        if t is not None and t.shape != input_ids.shape:
            raise ParameterError(f"{name} has shape {tuple(t.shape)} but input_ids has shape {tuple(input_ids.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ParameterError(f"labels must be an integer tensor, got {labels.dtype}")


def sequence_logps(model, input_ids: Tensor, attention_mask: Tensor | None, labels: Tensor, *,
                   ignore_index: int = -100, fused: bool = True, chunk_size: int | None = None) -> SequenceLogps:
    """Summed log-probs ``[B]`` of the labelled (response) tokens of each row, and their counts.

    Args:
        model: a transformers causal LM (``AutoModelForCausalLM``), any dtype/device.
        input_ids, attention_mask, labels: ``[B, T]``; labels aligned with input_ids,
            ``ignore_index`` where no token is scored (prompt, padding).
        fused: True: decoder hidden states + ``token_logprobs`` (no ``[B, T, V]``);
            False: the model's logits, ``log_softmax`` in fp32, gather (the naive path).
        chunk_size: tokens per chunk of the fused path (default from a memory budget).
    """
    _check(input_ids, attention_mask, labels)
    targets = labels[:, 1:]
    if fused:
        hidden = final_hidden(model, input_ids, attention_mask)[:, :-1]
        return response_logps(hidden, lm_head_weight(model), targets, ignore_index=ignore_index, chunk_size=chunk_size)
    lengths = (targets != ignore_index).sum(-1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    log_probs = torch.log_softmax(logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32), dim=-1)
    mask = targets != ignore_index
    picked = log_probs.gather(-1, torch.where(mask, targets, 0).long()[..., None]).squeeze(-1)
    tokens = torch.where(mask, picked, 0.0)
    return SequenceLogps(tokens.sum(-1), lengths, targets=targets, tokens=tokens)


def response_logps(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                   chunk_size: int | None = None) -> SequenceLogps:
    """Summed log-probs ``[B]`` of the scored ``targets`` ``[B, T-1]`` from the shifted final hidden states
    ``[B, T-1, H]`` (row ``t`` scores ``targets[t]``) and the lm_head ``weight`` ``[V, H]``, through the fused
    token log-prob op: what :func:`sequence_logps` and the training algorithms both compute with."""
    per_token = token_logprobs(hidden, weight, targets, ignore_index=ignore_index, chunk_size=chunk_size)
    return SequenceLogps(per_token.sum(-1), (targets != ignore_index).sum(-1), hidden, targets, weight, per_token)


QWEN_VOCAB = 151_936


def tiny_qwen2(*, vocab_size: int = QWEN_VOCAB, hidden_size: int = 32, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int | None = None, tie_word_embeddings: bool = False,
               seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised Qwen2-architecture causal LM built from a config (no download).

    For tests, benchmarks and the quickstart: the real architecture and vocab
    (151,936 by default) at a size that runs on a CPU.
    """
    from transformers import Qwen2ForCausalLM

    config = _tiny_qwen2_config(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                                num_heads=num_heads, num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                                tie_word_embeddings=tie_word_embeddings)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    return model.to(dtype)


def _tiny_qwen2_config(*, vocab_size: int = QWEN_VOCAB, hidden_size: int = 32, num_layers: int = 2,
                       num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                       tie_word_embeddings: bool = False, seed: int = 0, dtype: torch.dtype = torch.float32):
    """The transformers config of :func:`tiny_qwen2` (same keywords; ``seed`` and ``dtype`` do not enter it)."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                       num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       intermediate_size=intermediate_size or 2 * hidden_size, max_position_embeddings=4096,
                       tie_word_embeddings=tie_word_embeddings)


def load_causal_lm(path: str, *, dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                   max_memory=None, gpus: list[int] | None = None):
    """A transformers causal LM from a local directory (never the hub), frozen into eval mode.

    With ``max_memory`` (``{gpu: 70GiB, cpu: 200GiB}``) the model is spread over ``gpus``,
    the CPU and disk instead of loaded onto ``device`` (see :mod:`distillzoo.models.placement`).
    transformers' progress bars ("Loading weights") stay off meanwhile: the command's own bar,
    or none, says what runs.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    if not Path(path).is_dir():
        raise ParameterError(f"model {str(path)!r} is not a directory; give a local transformers model directory "
                             "(config.json and weights), nothing is downloaded")
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ParameterError(f"dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        dtype = getattr(torch, dtype)
    try:
        with without_transformers_bars():
            if max_memory is not None:
                from distillzoo.models.placement import load_placed, parse_budgets

                return load_placed(path, parse_budgets(max_memory, "max_memory"), list(gpus or []), dtype)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ParameterError(f"model {str(path)!r} could not be loaded as a transformers causal LM: {e}") from None
    return model.to(device or "cpu").eval()


@contextlib.contextmanager
def without_transformers_bars() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off for the block, then back as they
    were: distillzoo's own bar, or none, says what runs."""
    from transformers.utils import logging as transformers_logging

    if not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


# ---------------------------------------------------------------------------- models named by a config
def model_given(mcfg) -> bool:
    """Whether a ``student`` / ``teacher`` / ``reference`` config section names a model (a path or a tiny config)."""
    return mcfg is not None and (mcfg.path is not None or mcfg.tiny is not None)


def require_model(cfg, role: str, needed_by: str, where: str) -> None:
    """A ConfigError unless ``cfg[role]`` names a model one way (a path or a tiny config)."""
    m = getattr(cfg, role)
    if m is None or (m.path is None) == (m.tiny is None):
        raise ConfigError(f"{where}: {role}: {needed_by} needs the {role}; give {role}.path or {role}.tiny")


#: the arguments a ``tiny:`` section may give (:func:`tiny_qwen2`'s, but its torch dtype)
TINY_ARGS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
             "tie_word_embeddings", "seed")


def tiny_kwargs(tiny, what: str) -> dict:
    """A ``tiny:`` section as :func:`tiny_qwen2`'s keywords (tied embeddings unless it says otherwise), each
    checked: an unknown argument, a size that is no positive integer, heads that do not divide the hidden
    size are a ConfigError naming ``what.tiny.KEY``."""
    from omegaconf import DictConfig, OmegaConf

    given = OmegaConf.to_container(tiny, resolve=True) if isinstance(tiny, DictConfig) else dict(tiny)
    for key in given:
        if key not in TINY_ARGS:
            raise ConfigError(f"{what}.tiny.{key}: unknown argument {key!r}; a tiny model takes {list(TINY_ARGS)}."
                              + did_you_mean(str(key), TINY_ARGS))
    kwargs = {"tie_word_embeddings": True, **given}
    for key, value in kwargs.items():
        if key == "tie_word_embeddings":
            ok, want = isinstance(value, bool), "true or false"
        elif key == "intermediate_size" and value is None:
            continue
        else:
            low = 0 if key == "seed" else 1
            ok, want = isinstance(value, int) and not isinstance(value, bool) and value >= low, f"an integer >= {low}"
        if not ok:
            raise ConfigError(f"{what}.tiny.{key}: {value!r} must be {want}")
    hidden, heads = kwargs.get("hidden_size", 32), kwargs.get("num_heads", 4)
    kv_heads = kwargs.get("num_kv_heads", 2)
    if hidden % heads:
        raise ConfigError(f"{what}.tiny.num_heads: {heads} heads do not divide hidden_size {hidden}")
    if heads % kv_heads:
        raise ConfigError(f"{what}.tiny.num_kv_heads: {kv_heads} key/value heads do not divide num_heads {heads}")
    return kwargs


def model_from_config(mcfg, what: str):
    """The model a ``student`` / ``teacher`` / ``reference`` section names: a local directory, or a tiny Qwen2."""
    if mcfg.path is not None:
        return load_causal_lm(mcfg.path)
    return tiny_qwen2(**tiny_kwargs(mcfg.tiny, what))


def model_fingerprint(model) -> str:
    """A short hash of a model's config and of a few values of each of its parameters: what tells an interrupted
    run's outputs from another model's (offloaded parameters count by name and shape only)."""
    import hashlib

    digest = hashlib.sha1(getattr(getattr(model, "config", None), "to_json_string", lambda: "")().encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            digest.update(f"{name}{tuple(p.shape)}".encode())
            if p.device.type != "meta":
                digest.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def place_model(mcfg, what: str, launch):
    """The model a section names, for inference on this rank (``launch``): on its device, or spread over its GPUs,
    the CPU and disk when the section gives ``max_memory``."""
    if mcfg.max_memory is None:
        return model_from_config(mcfg, what).to(launch.device()).eval()
    if mcfg.path is None:
        raise ConfigError(f"{what}.max_memory: places a model loaded from {what}.path; a tiny one is built whole")
    from omegaconf import OmegaConf

    return load_causal_lm(mcfg.path, max_memory=OmegaConf.to_container(mcfg.max_memory), gpus=launch.gpus())


def ties_head(mcfg) -> bool | None:
    """Whether the model a section names ties its lm_head to its input embeddings (its config says; a tiny
    model ties them unless told not to); None when its config cannot be read."""
    if mcfg.tiny is not None:
        return bool(mcfg.tiny.get("tie_word_embeddings", True))
    if mcfg.path is None:
        return None
    from transformers import AutoConfig

    try:
        return bool(AutoConfig.from_pretrained(mcfg.path, local_files_only=True).tie_word_embeddings)
    except (OSError, ValueError):
        return None


def meta_model(mcfg, what: str = "model"):
    """The model a section names, built on the meta device from its config (no weights read or allocated), for
    counting parameters and naming modules before anything loads; None when its config cannot be read
    (loading it reports why)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if mcfg.tiny is not None:
            kwargs = tiny_kwargs(mcfg.tiny, what)
            kwargs.pop("seed", None)
            config = _tiny_qwen2_config(**kwargs)
        elif mcfg.path is not None:
            config = AutoConfig.from_pretrained(mcfg.path, local_files_only=True)
        else:
            return None
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def parameter_count(mcfg, model=None) -> int | None:
    """How many parameters the model a section names has, counted on the meta device (no weights are
    read or allocated; ``model``: its :func:`meta_model`, when built already); None when its config cannot
    be read (loading it reports why)."""
    model = meta_model(mcfg) if model is None else model
    return None if model is None else sum(p.numel() for p in model.parameters())  # tied weights once, as saved


def model_vocab(mcfg) -> int | None:
    """The vocab size a model section declares, read without building the model (config.json, or the tiny
    config); None when it cannot be told."""
    if mcfg.tiny is not None:
        return int(mcfg.tiny.get("vocab_size", QWEN_VOCAB))
    if mcfg.path is not None:
        import json
        from pathlib import Path

        try:
            config = json.loads((Path(mcfg.path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # loading reports it
        value = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
        return int(value) if isinstance(value, int) else None
    return None


def check_vocab(cfg, role: str, tokenizer_vocab: int, where: str) -> None:
    """A ConfigError when ``cfg[role]``'s model has fewer vocab entries than the tokenizer has ids."""
    section = getattr(cfg, role)
    vocab = model_vocab(section)
    if vocab is not None and vocab < tokenizer_vocab:
        source = f"{section.path}/config.json" if section.path is not None else f"{role}.tiny.vocab_size"
        raise ConfigError(f"{where}: {role}: its vocab has {vocab:,} entries ({source}) but the tokenizer has "
                          f"{tokenizer_vocab:,} ids; ids from {vocab:,} up would index past its embedding. Use a "
                          "model of this tokenizer's family, or its tokenizer (data.tokenizer)")
