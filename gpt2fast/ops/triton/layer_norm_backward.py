"""The backward of LayerNorm (with or without the fused residual) as two Triton kernels.

``_layer_norm_bwd_kernel``: G programs (:func:`~gpt2fast.ops.triton._common.partial_programs`, about four per SM),
each taking every G-th row.  A program holds the weight and its partial ``dweight``/``dbias`` column sums in fp32
registers; per row it reads ``h`` and ``grad_y`` once, recomputes the statistics exactly as the forward does
(:func:`~gpt2fast.ops.triton.layer_norm._centred`), writes ``dh = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy *
xhat))`` (plus ``grad_h``, the gradient reaching the residual stream) and adds ``dy * xhat`` and ``dy`` to its
partial sums, which it stores as one row of an fp32 [G, 2N] buffer.  ``column_sums`` then adds the G rows up (one
launch for each half) in a fixed order (no atomics: the result is the same run to run), as the second stage of
the Triton LayerNorm tutorial.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.triton._common import (
    TL_DTYPE,
    CompileCase,
    column_sum_cases,
    column_sums,
    launch,
    next_pow2,
    partial_programs,
    signature,
)
from gpt2fast.ops.triton._tuning import layer_norm_heuristic
from gpt2fast.ops.triton.layer_norm import _centred

#: Longest row the backward holds in registers (it keeps about twice the forward's live values).
MAX_N = 8192


@triton.jit
def _layer_norm_bwd_kernel(
    DY, H, W, GH, DH, Partial, M, N, eps, HAS_GRAD_H: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    pid = tl.program_id(0)
    pid64 = pid.to(tl.int64)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, M, programs):
        r = r0 + pid64  # int64 row index (a range() over program ids is a plain int under the interpreter)
        if r < M:
            row = r * N
            h = tl.load(H + row + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + row + cols, mask=mask, other=0.0).to(tl.float32)
            diff, rstd = _centred(h, cols, mask, N, eps)
            xhat = diff * rstd
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / N
            c2 = tl.sum(wdy, axis=0) / N
            dh = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_GRAD_H:
                dh += tl.load(GH + row + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DH + row + cols, dh.to(DH.dtype.element_ty), mask=mask)
            dw += dy * xhat
            db += dy
    out = Partial + pid64 * 2 * N
    tl.store(out + cols, dw, mask=mask)
    tl.store(out + N + cols, db, mask=mask)


def supports(grad_y, h, weight, eps, grad_h) -> str | None:
    """Rows up to :data:`MAX_N` wide (a row and the partial sums are held in registers)."""
    if h.shape[-1] > MAX_N:
        return f"triton layer_norm_backward keeps a row in registers: N must be <= {MAX_N}, got {h.shape[-1]}"
    return None


@torch.library.custom_op("gpt2fast_triton::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(
    grad_y: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float, grad_h: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh, dweight, dbias)`` of LN over the last dim; ``dh`` includes ``grad_h`` when given."""
    n = h.shape[-1]
    rows = h.numel() // n
    h, grad_y = h.contiguous(), grad_y.contiguous()
    grad_h = None if grad_h is None else grad_h.contiguous()
    dh = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    programs = partial_programs(rows, h.device)
    partial = torch.empty((programs, 2 * n), dtype=torch.float32, device=h.device)
    args = (grad_y, h, weight.contiguous(), dh if grad_h is None else grad_h, dh, partial, rows, n, eps)
    consts = dict(HAS_GRAD_H=grad_h is not None, BLOCK_N=next_pow2(n))
    launch(_layer_norm_bwd_kernel, None, (programs,), args, consts, layer_norm_heuristic(n))
    return dh, column_sums(partial[:, :n], weight.dtype), column_sums(partial[:, n:], weight.dtype)


@layer_norm_backward_op.register_fake
def _(grad_y, h, weight, eps, grad_h):
    return torch.empty(h.shape, dtype=h.dtype, device=h.device), torch.empty_like(weight), torch.empty_like(weight)


@register_impl("layer_norm_backward", "triton", supports=supports)
def layer_norm_backward(grad_y, h, weight, eps, grad_h):
    """``(dh, dweight, dbias)``: one kernel over the rows, one over the partial column sums."""
    return tuple(layer_norm_backward_op(grad_y, h, weight, float(eps), grad_h))


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The heuristic config (the only one: no autotuning) for every dtype at N = 1600 with and without grad_h, fp16
    at every GPT-2 width and at :data:`MAX_N`; ``full``: every dtype x width x flag.  The column-sum kernel's
    config per dtype.  The same on every target ``arch``."""
    cases = []
    for dtype, tname in TL_DTYPE.items():
        for n in (768, 1024, 1280, 1600, MAX_N):
            for has_gh in (False, True):
                if not (full or n == 1600 or (dtype == torch.float16 and has_gh)):
                    continue
                ptr = "*" + tname
                consts = dict(HAS_GRAD_H=has_gh, BLOCK_N=next_pow2(n))
                types = dict(DY=ptr, H=ptr, W=ptr, GH=ptr, DH=ptr, Partial="*fp32", M="i32", N="i32", eps="fp32")
                cfg = layer_norm_heuristic(n)
                label = f"{tname} N={n} grad_h={int(has_gh)} warps={cfg.num_warps}"
                sig = signature(_layer_norm_bwd_kernel, types, consts)
                cases.append(CompileCase("layer_norm_bwd", _layer_norm_bwd_kernel, sig, consts, cfg.num_warps, 1,
                                         label, True))  # fmt: skip
    return cases + column_sum_cases()
