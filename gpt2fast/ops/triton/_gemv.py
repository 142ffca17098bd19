"""The pieces of the decode GEMV kernels (``fused_linear``, ``fused_mlp``): LayerNorm row statistics as a
prologue, one output tile of ``LN?(x) @ W.T`` over a range of K, and the launch plan.

A decode step multiplies at most 16 rows by weights of ``nn.Linear``'s layout ``[N, K]`` (K contiguous), so
each program streams whole rows of its ``BLOCK_N`` weight rows with wide, contiguous loads (``BLOCK_K``
elements per row per step: 128-bit loads per thread) and accumulates in fp32.  With one row (batch 1) the tile
is an FMA outer loop (``acc[BLOCK_N, BLOCK_K] += w * x``, summed once at the end); with 2-16 rows, padded to 16,
it is ``tl.dot`` (tensor cores for fp16/bf16, full-precision FMA for fp32).  Each program normalises the rows
it needs itself (the LayerNorm prologue): the rows are a few KB, read from L2 by every program, while the
weights are read once in all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gpt2fast.ops.triton._common import interpreting, next_pow2, num_sms

#: Most rows a decode GEMV program holds (batch <= 16): one tile of BLOCK_M = 16 rows.
MAX_ROWS = 16
#: Warps of a GEMV program: its tiles hold at most 4096 weight elements (32 per thread).
GEMV_WARPS = 4


@triton.jit
def row_stats(X, rows, row_mask, K, stride_xm, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """LayerNorm statistics of the rows ``X[rows, :K]`` in fp32: ``(shift, mean, rstd)``.

    The sums run over the row shifted by its first element (``shift``), so a row with a huge mean and a small
    spread keeps its variance; ``mean`` is the mean of the shifted row, so ``x - shift - mean`` is ``x`` centred.
    """
    x_rows = X + rows.to(tl.int64) * stride_xm
    shift = tl.load(x_rows, mask=row_mask, other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # no column mask: the loads stay 128-bit vectors
            m = row_mask[:, None]
        else:
            m = row_mask[:, None] & (cols < K)[None, :]
        x = tl.load(x_rows[:, None] + cols[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, x - shift[:, None], 0.0)
        s1 += tl.sum(d, axis=1)
        s2 += tl.sum(d * d, axis=1)
    mean = s1 / K
    var = tl.maximum(s2 / K - mean * mean, 0.0)
    return shift, mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def gemv_tile(
    X, W, LnW, LnB, rows, row_mask, offs_n, n_mask, k_lo, k_hi, stride_xm, stride_wn, shift, mean, rstd,
    HAS_LN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_F32: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """``LN?(X[rows, k_lo:k_hi]) @ W[offs_n, k_lo:k_hi].T`` as an fp32 ``[BLOCK_M, BLOCK_N]`` tile.

    The normalised rows are rounded to the weight dtype before the product, as the unfused LayerNorm's output is
    (not under ``DOT_F32``: fp32, or bf16 upcast for the interpreter).  Masked rows and columns contribute 0.
    ``EVEN_K``: every K step is whole (no column mask, so the loads stay 128-bit vectors).
    """
    x_rows = X + rows.to(tl.int64)[:, None] * stride_xm
    w_rows = W + offs_n.to(tl.int64)[:, None] * stride_wn
    if BLOCK_M == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:  # masks constant along K: the loads stay 128-bit vectors
            x_mask = row_mask[:, None]
            w_mask = n_mask[:, None]
        else:
            k_mask = cols < k_hi
            x_mask = row_mask[:, None] & k_mask[None, :]
            w_mask = n_mask[:, None] & k_mask[None, :]
        x = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0)
        if HAS_LN:
            if EVEN_K:
                g = tl.load(LnW + cols).to(tl.float32)
                b = tl.load(LnB + cols).to(tl.float32)
            else:
                g = tl.load(LnW + cols, mask=k_mask, other=0.0).to(tl.float32)
                b = tl.load(LnB + cols, mask=k_mask, other=0.0).to(tl.float32)
            xn = (x.to(tl.float32) - shift[:, None] - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
            x = tl.where(x_mask, xn, 0.0)
            if not DOT_F32:
                x = x.to(W.dtype.element_ty)
        w = tl.load(w_rows + cols[None, :], mask=w_mask, other=0.0)
        if BLOCK_M == 1:
            acc += w.to(tl.float32) * x.to(tl.float32)
        elif DOT_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x.to(W.dtype.element_ty), tl.trans(w), acc)
    if BLOCK_M == 1:
        tile = tl.reshape(tl.sum(acc, axis=1), [1, BLOCK_N])
    else:
        tile = acc
    return tile


# ---- plans -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvPlan:
    """How a GEMV of ``m`` rows over ``[n, k]`` weights is cut: tiles of ``block_n`` output columns, each
    split over K into ``split_k`` ranges of ``k_split`` elements (a multiple of ``block_k``)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_split: int
    num_warps: int

    def grid(self, n: int) -> tuple[int, int]:
        """The launch grid: (column tiles, K splits)."""
        return (triton.cdiv(n, self.block_n), self.split_k)


def target_programs(device: torch.device) -> int:
    """Programs a launch aims for: two per SM on a GPU (every SM streams weights; a GEMV program is small, so
    both are resident at once), 8 under the interpreter (which runs programs one after the other)."""
    return 8 if interpreting() else 2 * num_sms(device)


def block_m(m: int) -> int:
    """Rows of a program's tile: 1 (the FMA path) for one row, else 16 (``tl.dot``'s smallest M)."""
    return 1 if m == 1 else MAX_ROWS


def block_k(k: int, dtype: torch.dtype, bm: int, block_n: int) -> int:
    """K per step: 512 bytes of each weight row at one row (128-bit loads, 32 threads a row), 64 elements for
    ``tl.dot``, halved once the FMA tile would pass 4096 elements; a whole row (up to 256) when interpreting."""
    kp = max(16, next_pow2(k))
    if interpreting():
        return min(kp, 256)
    if bm > 1:
        return min(kp, 64)
    bk = 512 // torch.empty((), dtype=dtype).element_size()
    while block_n * bk > 4096 and bk > 64:
        bk //= 2
    return min(kp, bk)


def gemv_plan(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, split_k: int | None = None) -> GemvPlan:
    """The plan of a GEMV (from the sizes and the device only, never data: graph-safe, deterministic).

    ``block_n`` spreads the N columns over :func:`target_programs` programs (4..64 columns at one row, 16..64
    with ``tl.dot``; up to 8192 under the interpreter, whose cost is per program); when that leaves fewer tiles
    than the target, K is split so the tiles x splits reach it (the partial sums are added by the last-arriving
    program of each tile, in split order).  ``split_k`` overrides the split count (tests).
    """
    bm = block_m(m)
    target = target_programs(device)
    lo = 4 if bm == 1 else 16
    bn = min(max(next_pow2(triton.cdiv(n, target)), lo), 8192 if interpreting() else 64)
    bk = block_k(k, dtype, bm, bn)
    tiles = triton.cdiv(n, bn)
    k_blocks = triton.cdiv(k, bk)
    want = split_k if split_k is not None else max(1, target // tiles)
    k_split = triton.cdiv(k_blocks, max(1, min(want, k_blocks))) * bk
    splits = triton.cdiv(k, k_split)
    return GemvPlan(bm, bn, bk, splits, k_split, 1 if interpreting() else GEMV_WARPS)
