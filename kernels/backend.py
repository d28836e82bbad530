"""Which implementation runs a vocab-scale op: Triton kernels, the chunked torch path, or the reference.

* CUDA tensors take the Triton kernels, CPU tensors the vocab-chunked torch path
  (:mod:`distillzoo.kernels.vocab_chunked`), which has the same numerics.
* ``DISTILLZOO_BACKEND=triton|torch|reference`` forces one, read at every call.
  ``reference`` is the definition-level path (whole-row log-softmax and autograd,
  O(rows x vocab) temporaries), for checking the other two.
* Triton runs CPU tensors only in its interpreter: set ``TRITON_INTERPRET=1``
  before the first kernel module is imported (they are imported on first use).
* The Triton kernels accumulate in fp32: float64 inputs always take the torch path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch
from torch import Tensor

from distillzoo.errors import ParameterError

BACKENDS = ("triton", "torch", "reference")
# Budget for the [chunk, vocab] temporaries of one token chunk (fused paths, row blocks).
# Overridable per call (chunk_size=) or by the environment (DISTILLZOO_CHUNK_BYTES).
DEFAULT_CHUNK_BYTES = 1 << 30
# The CPU path's budget: its [V, c] buffers are transformed in place, so chunks of 70 to 216 tokens at
# Qwen's vocab (104 for fkl's two buffers, 216 for token_logprobs' one) keep the GEMMs near full speed
# (narrower ones run 15-20% slower on a 2-core AMD EPYC), and the weight gradient stays the main cost in
# memory (bench/README: fused fkl at about 14% of the naive path's peak).
DEFAULT_CPU_CHUNK_BYTES = 128 << 20
ENV = "DISTILLZOO_BACKEND"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs its interpreter (TRITON_INTERPRET=1), which takes CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def forced() -> str | None:
    """The backend named by DISTILLZOO_BACKEND, or None when unset/empty."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ParameterError(f"{ENV}={value!r} is not one of {list(BACKENDS)}")
    return value


def backend_for(tensor: Tensor) -> str:
    """The backend that runs an op on ``tensor``: forced by the environment, else by its device and dtype."""
    choice = forced()
    if choice == "triton":
        if not triton_installed():
            raise ParameterError(f"{ENV}=triton but triton is not installed")
        if not tensor.is_cuda and not interpreting():
            raise ParameterError(
                f"{ENV}=triton with a tensor on {tensor.device}: Triton runs CPU tensors only in its interpreter; "
                "set TRITON_INTERPRET=1 before the first kernel runs, or use a CUDA device"
            )
        return "triton" if tensor.dtype in TRITON_DTYPES else "torch"
    if choice is not None:
        return choice
    if tensor.is_cuda and tensor.dtype in TRITON_DTYPES and triton_installed():
        return "triton"
    return "torch"


def kernel_module(name: str):
    """A Triton kernel module of this package, imported on first use (after TRITON_INTERPRET is read)."""
    return importlib.import_module(f"distillzoo.kernels.{name}")


def launch_grid_device(tensor: Tensor):
    """A context that makes ``tensor``'s CUDA device current for a launch (a no-op on CPU)."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def unit_stride(x: Tensor) -> Tensor:
    """``x`` [rows, cols] with unit column stride (a copy only when needed); rows may be strided."""
    return x if x.stride(-1) == 1 else x.contiguous()


def block_size(width: int, cap: int = 4096) -> int:
    """Vocab tile width: a power of two, at most ``cap``."""
    block = 1
    while block < min(width, cap):
        block *= 2
    return max(block, 16)


_MIXED_ADDMM: dict[str, bool] = {}


def accumulate_weight_grad(grad_w: Tensor, dz: Tensor, h: Tensor) -> None:
    """``grad_w += dz.T @ h`` with ``grad_w`` fp32 for bf16/fp16 weights.

    On CUDA, bf16/fp16 ``dz`` and ``h`` go through the tensor cores with fp32
    output (``addmm`` with ``out_dtype``, where this torch has it); otherwise both
    are upcast and multiplied in fp32.
    """
    low = dz.dtype if dz.dtype == h.dtype and dz.dtype in (torch.float16, torch.bfloat16) else None
    if low is not None and grad_w.dtype == torch.float32 and dz.is_cuda and _MIXED_ADDMM.get("ok", True):
        try:
            torch.addmm(grad_w, dz.T, h, out_dtype=torch.float32, out=grad_w)
            _MIXED_ADDMM["ok"] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _MIXED_ADDMM["ok"] = False
    grad_w.addmm_(dz.T.to(grad_w.dtype), h.to(grad_w.dtype))


def balanced_chunks(rows: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """``rows`` in the fewest pieces of at most ``chunk``, of near-equal sizes that are multiples of 8.

    Not ``rows.split(chunk)``: its last piece can be a few tokens, and a GEMM that narrow
    takes other, slower BLAS kernels (MKL, under 16 columns). Multiples of 8 keep the GEMMs
    on their full-width kernels (sizes like 69 cost about 10% on a 2-core AMD EPYC).
    """
    n = rows.numel()
    if not n:
        return ()
    pieces = -(-n // chunk)
    size = min(chunk, -(-(-(-n // pieces)) // 8) * 8)
    return rows.split(size)


def auto_chunk_rows(vocab: int, budget_bytes: int | None = None, bytes_per_entry: int = 32, cpu: bool = False) -> int:
    """Tokens per fused chunk (or row block) so that the [chunk, vocab] temporaries fit the budget.

    ``bytes_per_entry``: bytes held per (token, vocab entry) at once; the torch path
    keeps about eight fp32 values, the Triton path two logits and one gradient.
    """
    default = DEFAULT_CPU_CHUNK_BYTES if cpu else DEFAULT_CHUNK_BYTES
    budget = budget_bytes or int(os.environ.get("DISTILLZOO_CHUNK_BYTES", default))
    rows = budget // (vocab * bytes_per_entry)
    return max(8, rows - rows % 8)


def weight_grad_dtype(ws: Tensor) -> torch.dtype:
    """The dtype dW is accumulated in: fp32 for bf16/fp16 weights, else the weight's own."""
    return torch.float32 if ws.dtype in (torch.float16, torch.bfloat16) else ws.dtype


def grad_buffers(hs: Tensor, ws: Tensor, need_h: bool, need_w: bool):
    """Zeroed dX (hidden's dtype) and dW buffers, dW in fp32 for bf16/fp16 weights; None where not needed."""
    acc_dtype = weight_grad_dtype(ws)
    grad_h = torch.zeros_like(hs) if need_h else None
    grad_w = torch.zeros(ws.shape, dtype=acc_dtype, device=ws.device) if need_w else None
    return grad_h, grad_w
