"""The backward of causal / full attention, FlashAttention-2 style, as three Triton kernels.

The forward saved ``out`` and the per-row log-sum-exp ``lse``; every probability tile is recomputed from them as
``P = exp2(q·kᵀ·scale·log2(e) - lse·log2(e))``, so no T x T matrix is ever stored.

* ``_attn_bwd_delta_kernel``: ``delta_i = sum_d dO_i · O_i`` (fp32 [B, H, T]), the row term of the softmax's
  backward.
* ``_attn_bwd_dkdv_kernel``: one program per (block of BLOCK_N keys, head, batch) holds its k and v and fp32
  dk/dv accumulators and streams the query blocks that see those keys: ``dv += Pᵀ·dO``, ``dS = P ∘ (dO·vᵀ -
  delta)``, ``dk += dSᵀ·q·scale``.
* ``_attn_bwd_dq_kernel``: one program per (block of BLOCK_M queries, head, batch) holds q, dO and an fp32 dq
  accumulator and streams the key blocks up to the diagonal: ``dq += dS·k·scale``.

dq is computed by its own kernel rather than accumulated with atomics by the dk/dv programs (FlashAttention-2's
choice), so the gradients are the same run to run.  Under causal masking each loop runs in two stages, as the
forward's: the blocks crossing the diagonal with the mask, the others without (rows or keys past T need no
mask in the dk/dv kernel: their loads are zero, which makes their contributions zero; the dq kernel masks the
columns past T, whose probabilities would overflow for very negative scores).  Any T, any strides of q, k, v and
grad_out; head dims 32/64/128; fp32 accumulation.  Heuristic tiles only (no autotuning yet):
``_tuning.attention_backward_heuristic``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.triton import attention as fwd
from gpt2fast.ops.triton._common import (
    TL_DTYPE,
    CompileCase,
    dot_precision,
    launch,
    signature,
    upcast_for_interpreter,
)
from gpt2fast.ops.triton._tuning import attention_backward_heuristic, tuning_arch

LOG2E = 1.4426950408889634


@triton.jit
def _program(BLOCK: tl.constexpr):
    """This program's (first row of its block, head, batch, batch·H + head) on a (blocks, H, B) grid."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    return tl.program_id(0) * BLOCK, h, b, b * tl.num_programs(1) + h


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, Delta, stride_ob, stride_oh, stride_ot, stride_db, stride_dh, stride_dt, T,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :], mask=rows, other=0.0)
    do = tl.load(
        DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :], mask=rows, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + (b * tl.num_programs(1) + h) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _dkdv_blocks(
    dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dt, offs_n, lo, hi, T, qk_scale,
    MASKED: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Fold query blocks [lo, hi) into this key block's (dk, dv); MASKED applies the causal mask.  Key rows past
    T are zeroed too: their probability would be exp2(-lse), which overflows for very negative scores (those
    rows are never stored, but inf in them is needless)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    key_rows = offs_n[:, None] < T
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        rows = offs_m < T
        q = tl.load(q_ptrs + start_m * stride_qt, mask=rows[:, None], other=0.0)
        do = tl.load(do_ptrs + start_m * stride_dt, mask=rows[:, None], other=0.0)
        lse2 = tl.load(lse_ptr + offs_m, mask=rows, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_m, mask=rows, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse2[None, :])  # [BN, BM]
        keep = key_rows
        if MASKED:
            keep = keep & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, Delta, DK, DV, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_db, stride_dh, stride_dt, stride_dd,
    T,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Grid (key blocks, H, B).  DK and DV are contiguous [B, H, T, HEAD_DIM]; LSE and Delta fp32 [B, H, T].
    start_n, h, b, bh = _program(BLOCK_N)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < T
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=keys, other=0.0)  # fmt: skip
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=keys, other=0.0)  # fmt: skip
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_ptrs = DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd
    lse_ptr = LSE + bh * T
    delta_ptr = Delta + bh * T
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M  # the first query block that sees one of these keys
        mid = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, tl.cdiv(T, BLOCK_M) * BLOCK_M)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dt, offs_n, lo, mid, T, qk_scale,
            True, UPCAST, PREC, BLOCK_M,
        )  # fmt: skip
    else:
        mid = 0
    dk, dv = _dkdv_blocks(
        dk, dv, k, v, q_ptrs, do_ptrs, lse_ptr, delta_ptr, stride_qt, stride_dt, offs_n, mid, T, T, qk_scale,
        False, UPCAST, PREC, BLOCK_M,
    )  # fmt: skip
    out = bh * T * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * sm_scale).to(DK.dtype.element_ty), mask=keys)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=keys)


@triton.jit
def _dq_blocks(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, lo, hi, T, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Fold key blocks [lo, hi) into this query block's dq; MASKED drops the columns past T (their probability
    would be exp2(-lse), which overflows for very negative scores) and, when CAUSAL, those after the row."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        keys = cols[:, None] < T
        k = tl.load(k_ptrs + start_n * stride_kt, mask=keys, other=0.0)
        v = tl.load(v_ptrs + start_n * stride_vt, mask=keys, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse2[:, None])  # [BM, BN]
        if MASKED:
            keep = cols[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, Delta, DQ, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_db, stride_dh, stride_dt, stride_dd,
    T,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Grid (query blocks, H, B).  DQ is contiguous [B, H, T, HEAD_DIM].
    start_m, h, b, bh = _program(BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < T
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=rows[:, None], other=0.0)  # fmt: skip
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dt + offs_d[None, :] * stride_dd,
                 mask=rows[:, None], other=0.0)  # fmt: skip
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + bh * T + offs_m, mask=rows, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + bh * T + offs_m, mask=rows, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        n_full = (start_m // BLOCK_N) * BLOCK_N  # key blocks every query row of this block sees
        hi = tl.minimum(start_m + BLOCK_M, T)
    else:
        n_full = (T // BLOCK_N) * BLOCK_N
        hi = T
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, 0, n_full, T, qk_scale,
        False, CAUSAL, UPCAST, PREC, BLOCK_N,
    )  # fmt: skip
    dq = _dq_blocks(
        dq, q, do, lse2, delta, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, n_full, hi, T, qk_scale,
        True, CAUSAL, UPCAST, PREC, BLOCK_N,
    )  # fmt: skip
    out = bh * T * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None])


def supports(grad_out, q, k, v, out, lse, causal, scale) -> str | None:
    """The forward's limits (head dims 32/64/128, B and H within the grid, int32 offsets per (batch, head)
    slice), for grad_out and out too."""
    return fwd.supports(q, k, v, causal, scale) or fwd.supports(grad_out, out, q, causal, scale)


@torch.library.custom_op("gpt2fast_triton::attention_backward", mutates_args=())
def attention_backward_op(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous [B, H, T, D]."""
    B, H, T, D = q.shape
    lse = lse.contiguous()
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    upcast = upcast_for_interpreter(q.dtype)
    dkdv_cfg, dq_cfg = attention_backward_heuristic(D, q.dtype, tuning_arch(q.device))
    bm = dq_cfg.kwargs["BLOCK_M"]
    delta_args = (out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], T)
    if out.stride(-1) != 1 or grad_out.stride(-1) != 1:
        out, grad_out = out.contiguous(), grad_out.contiguous()
        delta_args = (out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], T)
    delta_cfg = triton.Config({"BLOCK_M": bm}, num_warps=dq_cfg.num_warps, num_stages=1)
    launch(_attn_bwd_delta_kernel, None, (triton.cdiv(T, bm), H, B), delta_args, dict(HEAD_DIM=D), delta_cfg)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    consts = dict(HEAD_DIM=D, CAUSAL=causal, UPCAST=upcast, PREC=dot_precision(q.dtype, upcast))
    grid = (triton.cdiv(T, dkdv_cfg.kwargs["BLOCK_N"]), H, B)
    args = (q, k, v, grad_out, lse, delta, dk, dv, scale, *strides, T)
    launch(_attn_bwd_dkdv_kernel, None, grid, args, consts, dkdv_cfg)
    args = (q, k, v, grad_out, lse, delta, dq, scale, *strides, T)
    launch(_attn_bwd_dq_kernel, None, (triton.cdiv(T, bm), H, B), args, consts, dq_cfg)
    return dq, dk, dv


@attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, causal, scale):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))


@register_impl("attention_backward", "triton", supports=supports)
def attention_backward(grad_out, q, k, v, out, lse, causal, scale):
    """FlashAttention-2 style backward from the saved ``out`` and ``lse``."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return tuple(attention_backward_op(grad_out, q, k, v, out, lse, causal, scale))


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The heuristic configs (the only ones launched: no autotuning) of the dk/dv and dq kernels for every dtype x
    head dim, causal (non-causal at fp16 D = 64), and of the delta kernel for fp16 and at D = 64, on target
    ``arch``; ``full``: every dtype x head dim x causal flag.  Unit last-dim strides are constexpr 1 (the JIT
    specialises them)."""
    cases = []
    for dtype, tname in TL_DTYPE.items():
        ptr = "*" + tname
        prec = dot_precision(dtype, False)
        for d in fwd.HEAD_DIMS:
            dkdv_cfg, dq_cfg = attention_backward_heuristic(d, dtype, arch)
            bm = dq_cfg.kwargs["BLOCK_M"]
            consts = dict(HEAD_DIM=d, BLOCK_M=bm)
            types = dict(O=ptr, DO=ptr, Delta="*fp32", T="i32")
            types.update({n: "i32" for n in _attn_bwd_delta_kernel.arg_names if n.startswith("stride")})
            sig = signature(_attn_bwd_delta_kernel, types, consts)
            w = dq_cfg.num_warps
            if full or dtype == torch.float16 or d == 64:
                cases.append(CompileCase("attention_bwd_delta", _attn_bwd_delta_kernel, sig, consts, w, 1,
                                         f"{tname} D={d} BLOCK_M={bm} w={w}", True))  # fmt: skip
            for causal in (True, False):
                if not (full or causal or (d == 64 and dtype == torch.float16)):
                    continue
                unit = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_dd=1)
                base = dict(HEAD_DIM=d, CAUSAL=causal, UPCAST=False, PREC=prec, **unit)
                for name, kernel, cfg in (("attention_bwd_dkdv", _attn_bwd_dkdv_kernel, dkdv_cfg),
                                          ("attention_bwd_dq", _attn_bwd_dq_kernel, dq_cfg)):  # fmt: skip
                    c = {**base, **cfg.kwargs}
                    types = dict(Q=ptr, K=ptr, V=ptr, DO=ptr, LSE="*fp32", Delta="*fp32", sm_scale="fp32", T="i32")
                    types.update(DK=ptr, DV=ptr, DQ=ptr)
                    types.update({n: "i32" for n in kernel.arg_names if n.startswith("stride") and n not in c})
                    sig = signature(kernel, {n: t for n, t in types.items() if n in kernel.arg_names}, c)
                    w, s = cfg.num_warps, cfg.num_stages
                    label = f"{tname} D={d} causal={int(causal)} {c['BLOCK_M']}x{c['BLOCK_N']} w={w} s={s}"
                    cases.append(CompileCase(name, kernel, sig, c, w, s, label, True))
    return cases
