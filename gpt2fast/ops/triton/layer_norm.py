"""LayerNorm (optionally fused with the residual add) as one Triton program per row.

Each program reads its row once, keeps it in registers, computes mean and variance in
fp32 of the row shifted by its first element (reductions over the registers, not a second
read of memory; the shift keeps rows with a huge mean and a tiny variance accurate) and writes
``LN(h)``; with a residual it first forms ``h = x + residual``, stores it, and normalises
the stored (rounded) ``h`` so the residual stream and the normalised value agree.
Any N up to :data:`MAX_N` works; N need not be a power of two (the row is masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.specs import layer_norm as spec
from gpt2fast.ops.specs import layer_norm_backward as backward_spec
from gpt2fast.ops.triton._common import TL_DTYPE, CompileCase, launch, next_pow2, signature
from gpt2fast.ops.triton._tuning import LAYER_NORM_CONFIGS, layer_norm_heuristic

#: Longest row one program holds in registers (fp32): beyond this it would spill.
MAX_N = 16384


@triton.jit
def _centred(x, cols, mask, N, eps):
    """``(x - mean, rstd)`` of a row held in fp32 registers (masked lanes 0): two passes over the registers on the
    row shifted by its first element (exact subtraction near the mean), so a huge mean with a tiny spread does not
    drown the variance in the rounding of an fp32 sum.  The forward and the backward share it."""
    x0 = tl.sum(tl.where(cols == 0, x, 0.0), axis=0)
    x = tl.where(mask, x - x0, 0.0)
    diff = tl.where(mask, x - tl.sum(x, axis=0) / N, 0.0)
    return diff, 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / N + eps)


@triton.jit
def _layer_norm_kernel(X, R, W, B, Y, H, N, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)
        tl.store(H + row + cols, h, mask=mask)
        x = h.to(tl.float32)
    diff, rstd = _centred(x, cols, mask, N, eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row + cols, (diff * rstd * w + b).to(Y.dtype.element_ty), mask=mask)


_layer_norm_tuned = triton.autotune(configs=LAYER_NORM_CONFIGS, key=["N", "HAS_RESIDUAL"])(_layer_norm_kernel)


def _launch(x: torch.Tensor, residual, weight, bias, eps: float, y: torch.Tensor, h) -> None:
    n = x.shape[-1]
    x = x.contiguous()
    args = (
        x,
        x if residual is None else residual.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        y,
        y if h is None else h,
        n,
        eps,
    )
    consts = dict(HAS_RESIDUAL=residual is not None, BLOCK_N=next_pow2(n))
    launch(_layer_norm_kernel, _layer_norm_tuned, (x.numel() // n,), args, consts, layer_norm_heuristic(n))


@torch.library.custom_op("gpt2fast_triton::layer_norm", mutates_args=())
def layer_norm_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LN(x) over the last dim (contiguous output)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, bias, eps, y, None)
    return y


@layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("gpt2fast_triton::add_layer_norm", mutates_args=())
def add_layer_norm_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, residual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LN(x + residual), x + residual)`` in one kernel."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y)
    _launch(x, residual, weight, bias, eps, y, h)
    return y, h


@add_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual):
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return y, torch.empty_like(y)


def supports(x, weight, bias, eps, residual) -> str | None:
    """Rows up to :data:`MAX_N` wide (a row is held in registers)."""
    if x.shape[-1] > MAX_N:
        return f"triton layer_norm keeps a row in registers: N must be <= {MAX_N}, got {x.shape[-1]}"
    return None


backward_spec.register_autograd(layer_norm_op, add_layer_norm_op, "triton")

#: The registered implementation: ``LN(x)``, or ``(LN(x + residual), x + residual)`` fused in one kernel;
#: differentiable (its backward: ``layer_norm_backward`` on triton, see triton/layer_norm_backward.py).
layer_norm = register_impl("layer_norm", "triton", supports=supports, differentiable=True)(
    spec.plain_or_fused(layer_norm_op, add_layer_norm_op)
)


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The heuristic config for fp16 at every GPT-2 width (768/1024/1280/1600) with residual, for every
    dtype at N=1600 with and without; every autotune config for fp16 N=1600 with residual.
    ``full``: every config x dtype x width x residual flag.  The same on every target ``arch`` (no config spills)."""
    cases = []
    for dtype, tname in TL_DTYPE.items():
        for n in (768, 1024, 1280, 1600):
            for has_res in (False, True):
                if not (full or n == 1600 or (dtype == torch.float16 and has_res)):
                    continue
                ptr = "*" + tname
                consts = dict(HAS_RESIDUAL=has_res, BLOCK_N=next_pow2(n))
                types = dict(X=ptr, R=ptr, W=ptr, B=ptr, Y=ptr, H=ptr, N="i32", eps="fp32")
                sig = signature(_layer_norm_kernel, types, consts)
                heur = layer_norm_heuristic(n)
                every = full or (dtype == torch.float16 and n == 1600 and has_res)
                for cfg in LAYER_NORM_CONFIGS if every else [heur]:
                    label = f"{tname} N={n} res={int(has_res)} warps={cfg.num_warps}"
                    is_heur = cfg.num_warps == heur.num_warps
                    cases.append(
                        CompileCase("layer_norm", _layer_norm_kernel, sig, consts, cfg.num_warps, 1, label, is_heur)
                    )
    return cases
