"""``fused_mlp`` as one Triton kernel: LayerNorm, c_fc + bias + GELU, c_proj + bias and the residual add.

The hidden dim H is cut into ``BLOCK_H`` slices, one program each (:func:`mlp_plan`: about two per SM).  A
program normalises its rows (the LayerNorm prologue), computes its slice of the GELU activations
``a = gelu(LN(x) @ fc_weight[slice].T + fc_bias[slice])`` (never written to memory) and multiplies it by its
columns of ``proj_weight`` into an fp32 partial output ``[rows, C]``.  The partials are then added by
last-arriving programs in a two-level tree of fixed shape: programs form groups of ``GROUP`` (about √P); the
last of a group to arrive adds its group's partials in program order, and the last group to finish adds the
group sums in group order, then the bias and the residual ``x``, and writes the output.  Which program arrives
last changes who adds, never the order of the additions, so results are bit-identical from run to run; the
counters are reset by whoever used them, so the kernel is one launch, graph-safe, with no memset.

Each weight is read once in all; the partials (P x rows x C fp32) stay in L2.  The cost is the serial tail of
the two reductions (each about √P partial rows), small at batch 1 and growing with the batch (unverified on a
GPU: see the README).  PDL as in ``fused_linear``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    interpreting,
    launch,
    next_pow2,
    signature,
    upcast_for_interpreter,
    use_pdl,
)
from gpt2fast.ops.triton._gemv import GEMV_WARPS, MAX_ROWS, block_k, block_m, gemv_tile, row_stats, target_programs


@triton.jit
def _mask(rows_ok, c_mask, EVEN_C: tl.constexpr):
    """The mask of a [rows, BLOCK_C] tile: rows only when every column block is whole."""
    if EVEN_C:
        mask = rows_ok
    else:
        mask = rows_ok & c_mask[None, :]
    return mask


@triton.jit
def _fused_mlp_kernel(
    X, LnW, LnB, Wfc, Bfc, Wproj, Bproj, Out, Part, GroupPart, Counters,
    M, C, H, stride_xm, stride_fc, stride_proj, stride_om, eps, GROUP, NUM_GROUPS,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_C: tl.constexpr, EVEN_H: tl.constexpr, DOT_F32: tl.constexpr, USE_PDL: tl.constexpr,
):  # fmt: skip
    # EVEN_*: C is a multiple of BLOCK_K / BLOCK_C, H of BLOCK_H, so the masks along the contiguous dims drop
    # out and the loads and stores stay 128-bit vectors.
    if USE_PDL:
        tl_cuda.gdc_launch_dependents()
        tl_cuda.gdc_wait()
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    row_mask = rows < M
    shift, mean, rstd = row_stats(X, rows, row_mask, C, stride_xm, eps, BLOCK_M, BLOCK_K, EVEN_K)
    # c_fc over this program's hidden slice, its bias and the GELU (zero outside H).
    offs_h = pid * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    a = gemv_tile(X, Wfc, LnW, LnB, rows, row_mask, offs_h, h_mask, 0, C, stride_xm, stride_fc,
                  shift, mean, rstd, True, BLOCK_M, BLOCK_H, BLOCK_K, DOT_F32, EVEN_K)  # fmt: skip
    a += tl.load(Bfc + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
    a = tl.where(h_mask[None, :], gelu_tanh(a), 0.0)
    if not DOT_F32:
        a = a.to(Wproj.dtype.element_ty)  # rounded like the unfused bias+GELU output
    # c_proj restricted to the slice: an fp32 partial [BLOCK_M, C].
    tile_rows = rows.to(tl.int64)[:, None] * C
    rows_ok = row_mask[:, None]
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        w_ptrs = Wproj + offs_c.to(tl.int64)[:, None] * stride_proj + offs_h[None, :]
        if EVEN_H:
            w = tl.load(w_ptrs, mask=c_mask[:, None], other=0.0)
        else:
            w = tl.load(w_ptrs, mask=c_mask[:, None] & h_mask[None, :], other=0.0)
        if BLOCK_M == 1:
            p = tl.reshape(tl.sum(w.to(tl.float32) * a.to(tl.float32), axis=1), [1, BLOCK_C])
        elif DOT_F32:
            p = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            p = tl.dot(a, tl.trans(w))
        dst = Part + pid.to(tl.int64) * BLOCK_M * C + tile_rows + offs_c[None, :]
        tl.store(dst, p, mask=_mask(rows_ok, c_mask, EVEN_C))
    # Level 1: the last program of each group adds the group's partials in program order.
    group = pid // GROUP
    first = group * GROUP
    size = tl.minimum(GROUP, tl.num_programs(0) - first)
    if arrive(Counters + group, size):
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = _mask(rows_ok, offs_c < C, EVEN_C)
            s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
            for j in range(first, first + size):
                src = Part + tile_rows + offs_c[None, :] + j * (BLOCK_M * C)  # < 2**31: see supports
                s += tl.load(src, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(GroupPart + group.to(tl.int64) * BLOCK_M * C + tile_rows + offs_c[None, :], s, mask=mask)
        tl.atomic_xchg(Counters + group, 0)
        # Level 2: the last group adds the group sums in group order, the bias and the residual.
        if arrive(Counters + NUM_GROUPS, NUM_GROUPS):
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                c_mask = offs_c < C
                mask = _mask(rows_ok, c_mask, EVEN_C)
                s = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
                for g in range(0, NUM_GROUPS):
                    src = GroupPart + tile_rows + offs_c[None, :] + g * (BLOCK_M * C)
                    s += tl.load(src, mask=mask, other=0.0, cache_modifier=".cg")
                s += tl.load(Bproj + offs_c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
                rows64 = rows.to(tl.int64)[:, None]
                s += tl.load(X + rows64 * stride_xm + offs_c[None, :], mask=mask, other=0.0).to(tl.float32)
                tl.store(Out + rows64 * stride_om + offs_c[None, :], s.to(Out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(Counters + NUM_GROUPS, 0)


@dataclass(frozen=True)
class MlpPlan:
    """``programs`` hidden slices of ``block_h``, in ``num_groups`` groups of ``group``; c_fc steps of
    ``block_k`` over C, c_proj and the reductions in column blocks of ``block_c``."""

    block_m: int
    block_h: int
    block_k: int
    block_c: int
    programs: int
    group: int
    num_groups: int
    num_warps: int

    def evens(self, c: int, h: int) -> dict[str, bool]:
        """The kernel's ``EVEN_*`` flags for width ``c`` and MLP width ``h``."""
        return dict(EVEN_K=c % self.block_k == 0, EVEN_C=c % self.block_c == 0, EVEN_H=h % self.block_h == 0)


def mlp_plan(m: int, c: int, h: int, dtype: torch.dtype, device: torch.device) -> MlpPlan:
    """The plan from the sizes and the device only (graph-safe, deterministic): hidden slices of 16..64 spread
    over :func:`~gpt2fast.ops.triton._gemv.target_programs` programs (16 elements, 32 bytes of each
    ``proj_weight`` row at fp16, at least), groups of ⌈√P⌉."""
    bm = block_m(m)
    bh = min(max(next_pow2(triton.cdiv(h, target_programs(device))), 16), 64)
    programs = triton.cdiv(h, bh)
    bk = block_k(c, dtype, bm, bh)
    cp = max(16, next_pow2(c))
    bc = min(cp, 2048 if interpreting() else (4096 // bh if bm == 1 else 64))
    group = math.isqrt(programs - 1) + 1 if programs > 1 else 1
    return MlpPlan(bm, bh, bk, bc, programs, group, triton.cdiv(programs, group), 1 if interpreting() else GEMV_WARPS)


def run(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias) -> torch.Tensor:
    """Launch the kernel; returns a new [M, C] tensor."""
    m, c = x.shape
    h = fc_weight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty((m, c), dtype=x.dtype, device=x.device)
    plan = mlp_plan(m, c, h, x.dtype, x.device)
    part = torch.empty((plan.programs, plan.block_m, c), dtype=torch.float32, device=x.device)
    group_part = torch.empty((plan.num_groups, plan.block_m, c), dtype=torch.float32, device=x.device)
    cnt = counters(x.device, plan.num_groups + 1)
    pdl = use_pdl(x.device)
    args = (
        x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, out, part, group_part, cnt,
        m, c, h, x.stride(0), fc_weight.stride(0), proj_weight.stride(0), out.stride(0), float(eps),
        plan.group, plan.num_groups,
    )  # fmt: skip
    consts = dict(plan.evens(c, h), BLOCK_M=plan.block_m, BLOCK_H=plan.block_h, BLOCK_K=plan.block_k,
                  BLOCK_C=plan.block_c, DOT_F32=x.dtype == torch.float32 or upcast_for_interpreter(x.dtype),
                  USE_PDL=pdl)  # fmt: skip
    config = triton.Config({}, num_warps=plan.num_warps, num_stages=1)
    launch(_fused_mlp_kernel, None, (plan.programs,), args, consts, config, **({"launch_pdl": True} if pdl else {}))
    return out


@torch.library.custom_op("gpt2fast_triton::fused_mlp", mutates_args=())
def fused_mlp_op(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
) -> torch.Tensor:
    """``x + c_proj(gelu(c_fc(LN(x))))`` in one launch; see the module docstring."""
    return run(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias)


@fused_mlp_op.register_fake
def _(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def supports(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias) -> str | None:
    """At most 16 rows, weight rows contiguous along their input dim, contiguous 1-D params."""
    if x.shape[0] > MAX_ROWS:
        return f"triton fused_mlp is a decode kernel for at most {MAX_ROWS} rows, got x with {x.shape[0]}"
    c, h = x.shape[1], fc_weight.shape[0]
    if (h + MAX_ROWS) * MAX_ROWS * c >= 2**31:  # the partials' offsets (programs x rows x C) are int32
        return f"triton fused_mlp indexes its partial sums with int32: C x H = {c} x {h} is too large"
    for name, w in (("fc_weight", fc_weight), ("proj_weight", proj_weight)):
        if w.stride(1) != 1 and w.shape[1] > 1:
            return f"triton fused_mlp streams weight rows in place: {name} needs stride 1 along dim 1, got {w.stride()}"
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias), ("fc_bias", fc_bias), ("proj_bias", proj_bias)):
        if t.shape[0] > 1 and t.stride(0) != 1:
            return f"triton fused_mlp needs a contiguous {name}, got stride {t.stride(0)}"
    return None


@register_impl("fused_mlp", "triton", supports=supports)
def fused_mlp(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias) -> torch.Tensor:
    """The whole MLP sublayer and its residual in one launch."""
    return fused_mlp_op(x, ln_weight, ln_bias, float(eps), fc_weight, fc_bias, proj_weight, proj_bias)


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The plans a GPU launch makes for GPT-2 small's and xl's MLP at batch 1 and 16 (13 for xl), fp16, and
    for small's at batch 1 and 16 in fp32 and bf16 (``full``: every dtype everywhere); with and without PDL
    on sm_90."""
    device = torch.device("meta")  # planned for 132 SMs (an H100/H200), as num_sms says off a GPU
    cases, seen = [], set()
    for dtype, tname in TL_DTYPE.items():
        for c, m in ((768, 1), (768, 16), (1600, 1), (1600, 13)):
            if not (full or dtype == torch.float16 or c == 768):
                continue
            plan = mlp_plan(m, c, 4 * c, dtype, device)
            for pdl in (False, True) if arch >= 90 else (False,):
                consts = dict(plan.evens(c, 4 * c), BLOCK_M=plan.block_m, BLOCK_H=plan.block_h,
                              BLOCK_K=plan.block_k, BLOCK_C=plan.block_c, DOT_F32=dtype == torch.float32,
                              USE_PDL=pdl)  # fmt: skip
                key = (tname, tuple(consts.items()))
                if key in seen:
                    continue
                seen.add(key)
                ptr = "*" + tname
                types = dict(X=ptr, LnW=ptr, LnB=ptr, Wfc=ptr, Bfc=ptr, Wproj=ptr, Bproj=ptr, Out=ptr,
                             Part="*fp32", GroupPart="*fp32", Counters="*i32", M="i32", C="i32", H="i32",
                             stride_xm="i32", stride_fc="i32", stride_proj="i32", stride_om="i32", eps="fp32",
                             GROUP="i32", NUM_GROUPS="i32")  # fmt: skip
                sig = signature(_fused_mlp_kernel, types, consts)
                label = (f"{tname} C={c} M={m} BM={plan.block_m} BH={plan.block_h} BK={plan.block_k} "
                         f"BC={plan.block_c} P={plan.programs} pdl={int(pdl)}")  # fmt: skip
                cases.append(CompileCase("fused_mlp", _fused_mlp_kernel, sig, consts, plan.num_warps, 1, label, True))
    return cases
