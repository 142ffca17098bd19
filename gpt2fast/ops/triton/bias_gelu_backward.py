"""The backward of the fused bias + GELU (tanh) as two Triton kernels.

``_bias_gelu_bwd_kernel``: a 2-D grid of (block of columns, one of G row programs); a program takes every G-th
row of its columns, writes ``dx = dy * gelu'(x + bias)`` (fp32 math, recomputed from the inputs) and keeps the
partial ``dbias`` of its rows in fp32 registers, stored as one row of an fp32 [G, N] buffer that ``column_sums``
adds up in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.triton._common import (
    TL_DTYPE,
    CompileCase,
    column_sums,
    launch,
    partial_programs,
    signature,
    tanh,
)
from gpt2fast.ops.triton._tuning import BIAS_GELU_CONFIGS, bias_gelu_heuristic


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, Bias, DX, Partial, M, N, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    pid = tl.program_id(1).to(tl.int64)
    programs = tl.num_programs(1)
    bias = tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r0 in range(0, M, programs):
        r = r0 + pid  # int64 (a range() over program ids is a plain int under the interpreter)
        if r < M:
            row = r * N
            u = tl.load(X + row + cols, mask=mask, other=0.0).to(tl.float32) + bias
            dy = tl.load(DY + row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tanh(0.7978845608028654 * (u + 0.044715 * u * u * u))
            # d/du 0.5·u·(1 + t): where t saturates to ±1 (1 - t² = 0, |u| >~ 10) the slope is exactly 1 or 0, and
            # the second term is skipped there so that u² overflowing to inf never makes 0 · inf = NaN
            sech2 = 1.0 - t * t
            inner = 0.5 * u * sech2 * 0.7978845608028654 * (1.0 + 0.134145 * u * u)
            slope = 0.5 * (1.0 + t) + tl.where(sech2 > 0.0, inner, 0.0)
            dx = dy * slope
            tl.store(DX + row + cols, dx.to(DX.dtype.element_ty), mask=mask)
            db += tl.where(mask, dx, 0.0)
    tl.store(Partial + pid * N + cols, db, mask=mask)


@torch.library.custom_op("gpt2fast_triton::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(
    grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dx, dbias)`` of gelu_tanh(x + bias) (contiguous dx)."""
    n = x.shape[-1]
    rows = x.numel() // n
    x, grad_y = x.contiguous(), grad_y.contiguous()
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    programs = partial_programs(rows, x.device)
    partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    cfg = bias_gelu_heuristic(n)
    grid = (triton.cdiv(n, cfg.kwargs["BLOCK_N"]), programs)
    launch(_bias_gelu_bwd_kernel, None, grid, (grad_y, x, bias.contiguous(), dx, partial, rows, n), {}, cfg)
    return dx, column_sums(partial, bias.dtype)


@bias_gelu_backward_op.register_fake
def _(grad_y, x, bias):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device), torch.empty_like(bias)


#: The registered implementation (the custom op itself).
bias_gelu_backward = register_impl("bias_gelu_backward", "triton")(bias_gelu_backward_op)


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The heuristic config (the only one launched: no autotuning) for every dtype; ``full``: every block x warps
    config of the forward's table too (the column-sum kernel: in layer_norm_backward's cases).  The same on every
    target."""
    cases = []
    heur = bias_gelu_heuristic(4 * 768)
    for tname in TL_DTYPE.values():
        ptr = "*" + tname
        for cfg in BIAS_GELU_CONFIGS if full else [heur]:
            consts = dict(cfg.kwargs)
            types = dict(DY=ptr, X=ptr, Bias=ptr, DX=ptr, Partial="*fp32", M="i32", N="i32")
            sig = signature(_bias_gelu_bwd_kernel, types, consts)
            is_heur = cfg.kwargs == heur.kwargs and cfg.num_warps == heur.num_warps
            label = f"{tname} BLOCK_N={cfg.kwargs['BLOCK_N']} warps={cfg.num_warps}"
            cases.append(CompileCase("bias_gelu_bwd", _bias_gelu_bwd_kernel, sig, consts, cfg.num_warps, 1, label,
                                     is_heur))  # fmt: skip
    return cases
