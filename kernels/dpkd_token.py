"""Triton row argmax of student and teacher logits in one pass, for token-level DPKD.

dpkd_token needs, per row, y+ = argmax of the teacher, y- = argmax of the student
and four logits; its gradient has two nonzero entries per row. So one read of
each row is all the vocab-scale work: this kernel returns both maxima and their
first indices (ties: lowest index, as ``torch.argmax``), and the objective does
the O(rows) rest. The torch path is :func:`distillzoo.kernels.vocab_chunked.argmax`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from distillzoo.kernels.backend import block_size, launch_grid_device, unit_stride


@triton.jit
def _row_argmax(row_ptr, V, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    best = float("-inf")
    index = 0
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        tile_best = tl.max(x, axis=0)
        # the first index of the tile's max (min over the columns that hold it)
        tile_index = tl.min(tl.where(x == tile_best, cols, V), axis=0)
        better = tile_best > best
        index = tl.where(better, tile_index, index)
        best = tl.where(better, tile_best, best)
    return best, index


@triton.jit
def _argmax_pair_kernel(s_ptr, s_stride, t_ptr, t_stride, s_best_ptr, s_index_ptr, t_best_ptr, t_index_ptr, V,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    best, index = _row_argmax(s_ptr + row * s_stride, V, BLOCK)
    tl.store(s_best_ptr + row, best)
    tl.store(s_index_ptr + row, index.to(tl.int64))
    best, index = _row_argmax(t_ptr + row * t_stride, V, BLOCK)
    tl.store(t_best_ptr + row, best)
    tl.store(t_index_ptr + row, index.to(tl.int64))


def argmax_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(student max, student argmax, teacher max, teacher argmax)`` of ``[rows, V]`` logits (fp32, int64)."""
    rows, vocab = student.shape
    student, teacher = unit_stride(student), unit_stride(teacher)
    out = [torch.empty(rows, dtype=dtype, device=student.device)
           for dtype in (torch.float32, torch.int64, torch.float32, torch.int64)]
    if rows:
        with launch_grid_device(student):
            _argmax_pair_kernel[(rows,)](student, student.stride(0), teacher, teacher.stride(0), *out, vocab,
                                         BLOCK=block_size(vocab), num_warps=8)
    return tuple(out)
