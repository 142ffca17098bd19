"""Causal / full attention forward in the style of FlashAttention-2, as a Triton kernel.

One program per (block of BLOCK_M queries, batch·head).  It streams keys/values in
blocks of BLOCK_N with an online softmax in the exp2 domain, fp32 running max/sum and
an fp32 output accumulator.  Under causal masking the key loop stops at the diagonal
(blocks wholly above it are never visited) and runs in two stages: blocks wholly below
the diagonal without any mask, then the few blocks on the diagonal (or past the end of
the sequence) with one.  Any T works, arbitrary strides are followed (no copies), head
dims 32/64/128 in fp16/bf16/fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._autograd import needs_grad
from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.specs import attention_backward as backward_spec
from gpt2fast.ops.triton._common import (
    TL_DTYPE,
    CompileCase,
    dot_precision,
    int32_span_reason,
    launch,
    next_pow2,
    signature,
    upcast_for_interpreter,
)
from gpt2fast.ops.triton._tuning import ATTENTION, attention_heuristic, tuning_arch

#: Head dims the kernel is compiled for.
HEAD_DIMS = (32, 64, 128)
#: CUDA's limit on grid dims 1 and 2, which carry H and B.
MAX_GRID_YZ = 65535


@triton.jit
def _attn_blocks(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, lo, hi, T, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Fold key/value blocks [lo, hi) into the running (acc, l_i, m_i); MASKED applies T and causal masks."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASKED:
            k = tl.load(k_ptrs + start_n * stride_kt, mask=cols[None, :] < T, other=0.0)
            v = tl.load(v_ptrs + start_n * stride_vt, mask=cols[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs + start_n * stride_kt)
            v = tl.load(v_ptrs + start_n * stride_vt)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, k, input_precision=PREC) * qk_scale  # k is loaded transposed: [HEAD_DIM, BLOCK_N]
        if MASKED:
            keep = cols[None, :] < T
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= cols[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(
    Q, K, V, O, LSE, sm_scale,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    T, T_BUCKET,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    STORE_LSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # STORE_LSE (a training forward): also write each row's log-sum-exp, natural log, to the fp32 [B, H, T] LSE
    # for the backward; the inference launch (False) compiles to the kernel without it.
    # T_BUCKET (next power of two of T) is only an autotuning key.  Grid (query blocks, H, B): grid dims
    # 1 and 2 are limited to 65535 each, so B and H get one each rather than B*H sharing one.
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < T, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        n_full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N  # key blocks every query row of this block sees
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)  # nothing past the last query row's diagonal
    else:
        n_full = (T // BLOCK_N) * BLOCK_N
        hi = T
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, 0, n_full, T, qk_scale,
        False, CAUSAL, UPCAST, PREC, BLOCK_N,
    )  # fmt: skip
    acc, l_i, m_i = _attn_blocks(
        acc, l_i, m_i, q, k_ptrs, v_ptrs, stride_kt, stride_vt, offs_m, offs_n, n_full, hi, T, qk_scale,
        True, CAUSAL, UPCAST, PREC, BLOCK_N,
    )  # fmt: skip
    out = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < T)
    if STORE_LSE:
        lse_ptrs = LSE + (b * tl.num_programs(1) + h) * T + offs_m
        tl.store(lse_ptrs, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=offs_m < T)


_attention_tuned = triton.autotune(
    configs=ATTENTION.configs,
    key=["T_BUCKET", "HEAD_DIM", "CAUSAL"],
    prune_configs_by={"early_config_prune": ATTENTION.prune},
)(_attention_kernel)


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> str | None:
    """A head dim the kernel is built for, B and H within the grid limit, and strides whose per-(batch, head)
    offsets fit in int32 (any layout is followed otherwise, no copies)."""
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"triton attention supports head dims {HEAD_DIMS}; got q with D={d}"
    if max(q.shape[0], q.shape[1]) > MAX_GRID_YZ:
        return (
            f"triton attention launches B and H on CUDA grid dims limited to {MAX_GRID_YZ}; "
            f"got q with B={q.shape[0]}, H={q.shape[1]}"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        reason = int32_span_reason(name, t, (2, 3))
        if reason is not None:
            return reason
    return None


@register_impl("attention", "triton", supports=supports, differentiable=True)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """FlashAttention-2 style forward over [B, H, T, D] (head dims 32/64/128).  When a gradient is needed it runs
    the training forward (which also saves the log-sum-exp; its backward is ``attention_backward``), else the
    inference one, unchanged."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if needs_grad(q, k, v):
        return attention_lse_op(q, k, v, causal, scale)[0]
    return attention_op(q, k, v, causal, scale)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, lse: torch.Tensor | None):
    """Launch the forward; with ``lse`` (fp32 [B, H, T]) it also writes each row's log-sum-exp there."""
    B, H, T, D = q.shape
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    upcast = upcast_for_interpreter(q.dtype)
    args = (q, k, v, o, o if lse is None else lse, scale, *q.stride(), *k.stride(), *v.stride(), *o.stride())
    consts = dict(
        HEAD_DIM=D, CAUSAL=causal, UPCAST=upcast, PREC=dot_precision(q.dtype, upcast), STORE_LSE=lse is not None
    )
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), H, B)
    heur = attention_heuristic(D, q.dtype, tuning_arch(q.device))
    # The training forward launches with the heuristic config (no autotuning yet), the config compile_check checks.
    tuned = _attention_tuned if lse is None else None
    launch(_attention_kernel, tuned, grid, (*args, T, next_pow2(T)), consts, heur)
    return o


@torch.library.custom_op("gpt2fast_triton::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """softmax(q·kᵀ·scale [causal])·v for [B, H, T, D] tensors of any strides; contiguous output (inference)."""
    return run(q, k, v, causal, scale, None)


@attention_op.register_fake
def _(q, k, v, causal, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.custom_op("gpt2fast_triton::attention_lse", mutates_args=())
def attention_lse_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training forward: ``(out, lse)``, lse the fp32 [B, H, T] log-sum-exp its backward recomputes from."""
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    return run(q, k, v, causal, scale, lse), lse


@attention_lse_op.register_fake
def _(q, k, v, causal, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(q.shape[:3], dtype=torch.float32)


backward_spec.register_autograd(attention_lse_op, "triton")


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The configs the kernel can launch with on target ``arch``: the heuristic config for every dtype x
    head dim (causal; non-causal too at D=64) and the autotune configs (after pruning for ``arch``) of
    fp16 D=64 causal (GPT-2's shape) for inference, and the heuristic config (its only one: it is not autotuned)
    of the training forward (``STORE_LSE``; causal) for every dtype x head dim; every combination (each dtype's
    own tiles) if ``full``.
    Unit last-dim strides are constexpr 1, as the JIT specialises them for contiguous tensors."""
    cases = []
    for dtype, tname in TL_DTYPE.items():
        for d in HEAD_DIMS:
            for causal in (True, False):
                for store_lse in (False, True):
                    if not (full or (causal or (d == 64 and not store_lse))):
                        continue
                    cases += _cases(dtype, tname, d, causal, store_lse, full, arch)
    return cases


def _cases(dtype, tname: str, d: int, causal: bool, store_lse: bool, full: bool, arch: int) -> list[CompileCase]:
    ptr = "*" + tname
    unit = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_od=1)
    prec = dot_precision(dtype, False)
    consts = dict(HEAD_DIM=d, CAUSAL=causal, UPCAST=False, PREC=prec, STORE_LSE=store_lse, **unit)
    heur = attention_heuristic(d, dtype, arch)
    # the autotune list at GPT-2's shape for inference; the training forward (same body plus the lse store) is
    # launched with its heuristic config only
    every = (full or (dtype == torch.float16 and d == 64 and causal)) and not store_lse
    cases = []
    for cfg in ATTENTION.launchable(dtype, d, arch, heur) if every else [heur]:
        c = {**consts, **cfg.kwargs}
        types = dict(Q=ptr, K=ptr, V=ptr, O=ptr, LSE="*fp32", sm_scale="fp32")
        names = _attention_kernel.arg_names
        types.update({n: "i32" for n in names if n.startswith(("stride", "T")) and n not in c})
        sig = signature(_attention_kernel, types, c)
        w, s = cfg.num_warps, cfg.num_stages
        bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
        label = f"{tname} D={d} causal={int(causal)} lse={int(store_lse)} {bm}x{bn} w={w} s={s}"
        is_heur = ATTENTION.tile(cfg) == ATTENTION.tile(heur)
        cases.append(CompileCase("attention", _attention_kernel, sig, c, w, s, label, is_heur))
    return cases
