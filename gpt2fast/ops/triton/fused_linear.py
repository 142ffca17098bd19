"""``fused_linear`` as one Triton kernel: a decode GEMV with a LayerNorm prologue and a bias / GELU / residual
epilogue.

Grid: (output-column tiles, K splits) from :func:`~gpt2fast.ops.triton._gemv.gemv_plan`.  A program computes
its rows' LayerNorm statistics (when there is a LayerNorm), then its ``[rows, BLOCK_N]`` tile over its K range
(:func:`~gpt2fast.ops.triton._gemv.gemv_tile`), and, without a K split, applies the epilogue and stores the
tile.  With a K split each program stores an fp32 partial tile; the last program of a column tile to arrive
(:func:`~gpt2fast.ops.triton._common.arrive`: one counter per tile) adds the partials in split order, applies
the epilogue and resets the counter.  Which program is last does not change the order of the sum: results are
bit-identical run to run, and one launch does everything (no second kernel, no memset: graph-safe).

On sm_90 and newer the kernel is launched with programmatic dependent launch and waits for the previous kernel
(``gdc_wait``) before it reads anything, so its launch overlaps the previous kernel's tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.triton._common import (
    TL_DTYPE,
    CompileCase,
    arrive,
    counters,
    gelu_tanh,
    launch,
    signature,
    upcast_for_interpreter,
    use_pdl,
)
from gpt2fast.ops.triton._gemv import MAX_ROWS, gemv_plan, gemv_tile, row_stats


@triton.jit
def _epilogue(acc, Bias, R, Out, rows, row_mask, offs_n, n_mask, stride_rm, stride_om,
              HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr):  # fmt: skip
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = gelu_tanh(acc)
    mask = row_mask[:, None] & n_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    if HAS_RES:
        acc += tl.load(R + rows64 * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + rows64 * stride_om + offs_n[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _fused_linear_kernel(
    X, W, Bias, LnW, LnB, R, Out, Part, Counters,
    M, N, K, K_SPLIT, stride_xm, stride_wn, stride_rm, stride_om, eps,
    HAS_BIAS: tl.constexpr, HAS_LN: tl.constexpr, GELU: tl.constexpr, HAS_RES: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_F32: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    if USE_PDL:
        tl_cuda.gdc_launch_dependents()
        tl_cuda.gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if HAS_LN:
        shift, mean, rstd = row_stats(X, rows, row_mask, K, stride_xm, eps, BLOCK_M, BLOCK_K, EVEN_K)
    else:
        shift = tl.zeros([BLOCK_M], dtype=tl.float32)  # unused without a LayerNorm
        mean = shift
        rstd = shift
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    acc = gemv_tile(X, W, LnW, LnB, rows, row_mask, offs_n, n_mask, k_lo, k_hi, stride_xm, stride_wn,
                    shift, mean, rstd, HAS_LN, BLOCK_M, BLOCK_N, BLOCK_K, DOT_F32, EVEN_K)  # fmt: skip
    if SPLIT:
        # Partials [splits, BLOCK_M, N] in fp32; the tile's last program to arrive adds them in split order.
        num_splits = tl.num_programs(1)
        tile = rows.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = row_mask[:, None] & n_mask[None, :]
        tl.store(Part + pid_k.to(tl.int64) * BLOCK_M * N + tile, acc, mask=mask)
        if arrive(Counters + pid_n, num_splits):
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(0, num_splits):
                total += tl.load(Part + s * BLOCK_M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(Counters + pid_n, 0)
            _epilogue(total, Bias, R, Out, rows, row_mask, offs_n, n_mask, stride_rm, stride_om,
                      HAS_BIAS, GELU, HAS_RES)  # fmt: skip
    else:
        _epilogue(acc, Bias, R, Out, rows, row_mask, offs_n, n_mask, stride_rm, stride_om, HAS_BIAS, GELU, HAS_RES)


def run(x, weight, bias, ln_weight, ln_bias, eps, gelu, residual, split_k: int | None = None) -> torch.Tensor:
    """Launch the kernel (``split_k`` overrides the plan's K split: tests); returns a new [M, N] tensor."""
    m, k = x.shape
    n = weight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    plan = gemv_plan(m, n, k, x.dtype, x.device, split_k)
    split = plan.split_k > 1
    part = torch.empty((plan.split_k, plan.block_m, n), dtype=torch.float32, device=x.device) if split else out
    cnt = counters(x.device, plan.grid(n)[0]) if split else out
    pdl = use_pdl(x.device)
    args = (
        x, weight, x if bias is None else bias, x if ln_weight is None else ln_weight,
        x if ln_bias is None else ln_bias, out if residual is None else residual, out, part, cnt,
        m, n, k, plan.k_split, x.stride(0), weight.stride(0), 0 if residual is None else residual.stride(0),
        out.stride(0), float(eps),
    )  # fmt: skip
    consts = dict(
        HAS_BIAS=bias is not None, HAS_LN=ln_weight is not None, GELU=gelu, HAS_RES=residual is not None,
        SPLIT=split, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, EVEN_K=k % plan.block_k == 0,
        DOT_F32=x.dtype == torch.float32 or upcast_for_interpreter(x.dtype), USE_PDL=pdl,
    )  # fmt: skip
    config = triton.Config({}, num_warps=plan.num_warps, num_stages=1)
    launch(_fused_linear_kernel, None, plan.grid(n), args, consts, config, **({"launch_pdl": True} if pdl else {}))
    return out


@torch.library.custom_op("gpt2fast_triton::fused_linear", mutates_args=())
def fused_linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    eps: float,
    gelu: bool,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """``[residual +] gelu?(LN?(x) @ weight.T + bias)`` in one launch; see the module docstring."""
    return run(x, weight, bias, ln_weight, ln_bias, eps, gelu, residual)


@fused_linear_op.register_fake
def _(x, weight, bias, ln_weight, ln_bias, eps, gelu, residual):
    return torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)


def supports(x, weight, bias, ln_weight, ln_bias, eps, gelu, residual) -> str | None:
    """At most 16 rows (a decode step), and weight rows contiguous along K (the weights are streamed in place,
    never copied); other strides of x and residual are fine (they are small, and copied when needed)."""
    if x.shape[0] > MAX_ROWS:
        return f"triton fused_linear is a decode GEMV for at most {MAX_ROWS} rows, got x with {x.shape[0]}"
    if weight.stride(1) != 1 and weight.shape[1] > 1:
        return f"triton fused_linear streams weight rows in place: weight needs stride 1 along K, got {weight.stride()}"
    return None


@register_impl("fused_linear", "triton", supports=supports)
def fused_linear(x, weight, bias, ln_weight, ln_bias, eps, gelu, residual) -> torch.Tensor:
    """One launch: LayerNorm prologue, GEMV (split over K when N is small), bias / GELU / residual epilogue."""
    return fused_linear_op(x, weight, bias, ln_weight, ln_bias, float(eps), gelu, residual)


#: (name, M, N, K, flags) of the compile cases at GPT-2 small's decode shapes.
_GPT2_CASES = (
    ("qkv", 1, 2304, 768, ("ln", "bias")),
    ("c_fc", 1, 3072, 768, ("ln", "bias", "gelu")),
    ("attn_proj", 1, 768, 768, ("bias", "residual")),
    ("mlp_proj", 1, 768, 3072, ("bias", "residual")),
    ("lm_head", 1, 50257, 768, ("ln",)),
)


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The plans a GPU launch makes at GPT-2 small's decode GEMVs (batch 1 and 16; batch 8 uses batch 16's
    tile), and gpt2-xl's at batch 1 and 13; fp16 everywhere, fp32 and bf16 at batch 1 and 16 of the QKV and LM
    head shapes; with and without PDL on sm_90.  ``full``: every dtype for every shape."""
    shapes = [(name, m, n, k, flags) for name, _, n, k, flags in _GPT2_CASES for m in (1, 16)]
    shapes += [(f"xl {name}", m, 1600 * n // 768, 1600 * k // 768, flags)
               for name, _, n, k, flags in _GPT2_CASES[:4] for m in (1, 13)]  # fmt: skip
    cases, seen = [], set()
    device = torch.device("meta")  # planned for 132 SMs (an H100/H200), as num_sms says off a GPU
    if True:
        for dtype, tname in TL_DTYPE.items():
            for name, m, n, k, flags in shapes:
                if not (full or dtype == torch.float16 or (name in ("qkv", "lm_head"))):
                    continue
                plan = gemv_plan(m, n, k, dtype, device)
                for pdl in (False, True) if arch >= 90 else (False,):
                    consts = dict(
                        HAS_BIAS="bias" in flags, HAS_LN="ln" in flags, GELU="gelu" in flags,
                        HAS_RES="residual" in flags, SPLIT=plan.split_k > 1, BLOCK_M=plan.block_m,
                        BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, EVEN_K=k % plan.block_k == 0,
                        DOT_F32=dtype == torch.float32, USE_PDL=pdl,
                    )  # fmt: skip
                    key = (tname, tuple(consts.items()))
                    if key in seen:
                        continue
                    seen.add(key)
                    ptr = "*" + tname
                    types = dict(X=ptr, W=ptr, Bias=ptr, LnW=ptr, LnB=ptr, R=ptr, Out=ptr, Part="*fp32",
                                 Counters="*i32", M="i32", N="i32", K="i32", K_SPLIT="i32", stride_xm="i32",
                                 stride_wn="i32", stride_rm="i32", stride_om="i32", eps="fp32")  # fmt: skip
                    sig = signature(_fused_linear_kernel, types, consts)
                    label = (f"{tname} {name} M={m} BM={plan.block_m} BN={plan.block_n} BK={plan.block_k} "
                             f"split={plan.split_k} pdl={int(pdl)}")  # fmt: skip
                    cases.append(
                        CompileCase("fused_linear", _fused_linear_kernel, sig, consts, plan.num_warps, 1, label, True)
                    )
    return cases
