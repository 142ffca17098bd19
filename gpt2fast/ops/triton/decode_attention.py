"""Single-token attention against a KV cache by flash-decoding, in one Triton launch.

The cache length is cut into ``num_splits`` slices of ``split_len`` positions.  The kernel
runs one program per (batch·head, slice): it reads that sequence's length from
``cache_seqlens`` in device memory (no host sync, so one compiled launch serves every
step and CUDA graphs can capture it), folds its slice into an fp32 online softmax and
writes a normalised partial output plus its log-sum-exp (log2 domain).  The last program of
a (batch·head) to arrive (one arrival counter each, :func:`~gpt2fast.ops.triton._common.arrive`)
merges the slices in slice order and writes the output, then resets its counter: no second
launch, and the same bits whoever arrives last.  With a single slice the program writes the
output itself.

The number of slices depends only on B·H, T_max and the GPU's SM count (never on the
lengths), and the partial buffers are sized from those, so nothing depends on data.

Appending ``k_new``/``v_new``: every program that covers position ``seqlens[b]`` takes
k_new/v_new from the arguments instead of the cache, so no program ever reads that slot,
and exactly one program (the slice that owns the position) writes it into the cache.
A length outside [0, T_max] (unchecked: ``check_seqlens=False`` or graph capture) is clamped into it, as the
CUDA kernel does; a full cache (length T_max) is attended to whole and nothing is appended.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.specs import decode_attention as spec
from gpt2fast.ops.triton._common import (
    TL_DTYPE,
    CompileCase,
    arrive,
    counters,
    int32_span_reason,
    interpreting,
    launch,
    num_sms,
    signature,
)
from gpt2fast.ops.triton._tuning import DECODE_SPLIT, decode_split_heuristic, split_bucket

#: Head dims the kernels are compiled for (the same as prefill attention).
HEAD_DIMS = (32, 64, 128)
#: Slices are a multiple of this many positions (the largest BLOCK_N) on a GPU.
SPLIT_GRANULE = 128
#: At most this many slices per sequence.
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    Q, Kc, Vc, Knew, Vnew, Seqlens, O, Opart, Lse, Counters, sm_scale,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_nb, stride_nh,
    H, T_max, SPLIT_LEN, NUM_SPLITS, SPLIT_BUCKET,
    HEAD_DIM: tl.constexpr, HAS_NEW: tl.constexpr, DIRECT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # SPLIT_BUCKET (the next power of two of SPLIT_LEN) is only an autotuning key.
    pid_bh = tl.program_id(0)  # B*H on grid dim 0 (up to 2**31 - 1; dims 1 and 2 stop at 65535)
    split = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    # Clamped to [0, T_max] like the CUDA kernel: unchecked lengths (graph capture, check_seqlens=False) never
    # index outside the cache; a length of T_max attends to the whole cache and appends nothing.
    seqlen = tl.minimum(tl.maximum(tl.load(Seqlens + b), 0), T_max)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = Kc + b * stride_kb + h * stride_kh
    v_base = Vc + b * stride_vb + h * stride_vh
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_d).to(tl.float32) * (sm_scale * 1.4426950408889634)
    if HAS_NEW:
        n_ctx = tl.minimum(seqlen + 1, T_max)
        k_new = tl.load(Knew + b * stride_nb + h * stride_nh + offs_d)
        v_new = tl.load(Vnew + b * stride_nb + h * stride_nh + offs_d)
        # The slice owning position seqlen writes it (vector-shaped mask: the interpreter rejects scalar ones).
        seq_d = tl.zeros([HEAD_DIM], dtype=tl.int32) + seqlen
        owner = (seq_d // SPLIT_LEN == split) & (seq_d < T_max)
        tl.store(k_base + seqlen * stride_kt + offs_d * stride_kd, k_new, mask=owner)
        tl.store(v_base + seqlen * stride_vt + offs_d * stride_vd, v_new, mask=owner)
    else:
        n_ctx = tl.minimum(seqlen, T_max)
    start = split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, n_ctx)
    m_i = tl.full([], float("-inf"), dtype=tl.float32)
    l_i = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        from_cache = valid
        if HAS_NEW:
            from_cache = valid & (pos != seqlen)  # the slot being appended is never read from the cache
        k_ptrs = k_base + pos[:, None] * stride_kt + offs_d[None, :] * stride_kd
        v_ptrs = v_base + pos[:, None] * stride_vt + offs_d[None, :] * stride_vd
        k = tl.load(k_ptrs, mask=from_cache[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptrs, mask=from_cache[:, None], other=0.0).to(tl.float32)
        if HAS_NEW:
            is_new = (pos == seqlen)[:, None]
            k = tl.where(is_new, k_new.to(tl.float32)[None, :], k)
            v = tl.where(is_new, v_new.to(tl.float32)[None, :], v)
        s = tl.where(valid, tl.sum(k * q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.math.exp2(s - m_new)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v, 0)
        m_i = m_new
    # l_i >= 1 whenever the slice is non-empty (the max term contributes exp2(0)); an empty one gives 0.
    out = acc / tl.maximum(l_i, 1.0)
    if DIRECT:
        tl.store(O + pid_bh * HEAD_DIM + offs_d, out.to(O.dtype.element_ty))
    else:
        row0 = pid_bh.to(tl.int64) * NUM_SPLITS
        tl.store(Opart + (row0 + split) * HEAD_DIM + offs_d, out)
        tl.store(Lse + row0 + split, m_i + tl.math.log2(tl.maximum(l_i, 1.0)))  # -inf for an empty slice
        if arrive(Counters + pid_bh, NUM_SPLITS):
            _combine(Opart, Lse, O, pid_bh, row0, NUM_SPLITS, HEAD_DIM)
            tl.atomic_xchg(Counters + pid_bh, 0)


@triton.jit
def _combine(Opart, Lse, O, pid_bh, row0, NUM_SPLITS, HEAD_DIM: tl.constexpr):
    """Merge the NUM_SPLITS partials of one (batch·head), in slice order (run by the last program to arrive)."""
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        m = tl.maximum(m, tl.load(Lse + row0 + s, cache_modifier=".cg"))
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s in range(0, NUM_SPLITS):
        w = tl.math.exp2(tl.load(Lse + row0 + s, cache_modifier=".cg") - m)  # 0 for an empty slice
        den += w
        acc += w * tl.load(Opart + (row0 + s) * HEAD_DIM + offs_d, cache_modifier=".cg")
    out = acc / tl.where(den > 0.0, den, 1.0)  # an empty sequence gives zeros
    tl.store(O + pid_bh * HEAD_DIM + offs_d, out.to(O.dtype.element_ty))


# Autotuning runs the split kernel several times on the real arguments.  That is safe without
# ``restore_value``: its only write to an input is the append, which stores k_new/v_new (never read
# back in the launch) at seqlens[b], so every repeat writes the same values.  The key is fixed per
# (B*H, T_max, dtype): no step re-tunes, and a CUDA graph captures an already-tuned launch.  It holds the
# bucket of the slice length, not the length: a cache that grows every step (patch_hf) re-tunes at most once
# per doubling, not every granule mid-stream.
_decode_split_tuned = triton.autotune(
    configs=DECODE_SPLIT.configs,
    key=["SPLIT_BUCKET", "HEAD_DIM", "HAS_NEW", "DIRECT"],
    prune_configs_by={"early_config_prune": DECODE_SPLIT.prune},
)(_decode_split_kernel)


def split_plan(bh: int, t_max: int, device: torch.device) -> tuple[int, int]:
    """``(num_splits, split_len)`` from B·H and T_max only: about two programs per SM, slices of
    at least one granule (128 positions; 16 under the interpreter), at most :data:`MAX_SPLITS`."""
    granule = 16 if interpreting() else SPLIT_GRANULE
    want = min(triton.cdiv(2 * num_sms(device), bh), triton.cdiv(t_max, granule), MAX_SPLITS)
    split_len = triton.cdiv(triton.cdiv(t_max, max(want, 1)), granule) * granule
    return triton.cdiv(t_max, split_len), split_len


def supports(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, *_: object) -> str | None:
    """A supported head dim, and cache strides whose offsets within one (batch, head) slice fit in int32; the
    op's other arguments are not read.  (Overlapping caches are rejected by the shared validation when
    appending.)"""
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"triton decode_attention supports head dims {HEAD_DIMS}; got q with D={d}"
    return int32_span_reason("k_cache", k_cache, (2, 3)) or int32_span_reason("v_cache", v_cache, (2, 3))


def run(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Launch the kernel; ``num_splits`` overrides :func:`split_plan` (tests)."""
    B, H, D = q.shape
    t_max = k_cache.shape[2]
    splits, split_len = split_plan(B * H, t_max, q.device)
    if num_splits is not None:
        splits, split_len = num_splits, triton.cdiv(t_max, num_splits)
    # q, k_new, v_new are read through their batch/head strides (the model passes views of its QKV projection):
    # copies only for a non-unit last stride, or for k_new/v_new whose strides differ (they share one pair).
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    has_new = k_new is not None
    if has_new and (k_new.stride() != v_new.stride() or k_new.stride(-1) != 1):
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    if not has_new:
        k_new = v_new = q  # unused
    direct = splits == 1
    if direct:
        opart = lse = cnt = out  # unused
    else:
        opart = torch.empty((B * H, splits, D), dtype=torch.float32, device=q.device)
        lse = torch.empty((B * H, splits), dtype=torch.float32, device=q.device)
        cnt = counters(q.device, B * H)
    args = (
        q, k_cache, v_cache, k_new, v_new, cache_seqlens, out, opart, lse, cnt, scale,
        q.stride(0), q.stride(1), *k_cache.stride(), *v_cache.stride(), k_new.stride(0), k_new.stride(1),
        H, t_max, split_len, splits, split_bucket(split_len),
    )  # fmt: skip
    consts = dict(HEAD_DIM=D, HAS_NEW=has_new, DIRECT=direct)
    launch(_decode_split_kernel, _decode_split_tuned, (B * H, splits), args, consts, decode_split_heuristic(D))
    return out


@torch.library.custom_op("gpt2fast_triton::decode_attention", mutates_args=spec.MUTATES, schema=spec.SCHEMA)
def decode_attention_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    """Flash-decoding with in-launch append; see the module docstring."""
    return run(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@register_impl("decode_attention", "triton", supports=supports)
def decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale) -> torch.Tensor:
    """Flash-decoding against the cache, appending k_new/v_new at ``cache_seqlens[b]`` in the same launch."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return decode_attention_op(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The configs the kernel can launch with on target ``arch``: the heuristic config per dtype x head dim
    (appending, several slices, so with the in-launch combine), fp16 D=64 also without append and with a single
    slice, and every autotune config (after pruning for ``arch``) at fp16 D=64 appending.  ``full``: everything.
    Unit last-dim cache strides are constexpr 1, as the JIT specialises them."""
    cases = []
    for dtype, tname in TL_DTYPE.items():
        ptr = "*" + tname
        for d in HEAD_DIMS:
            gpt2 = dtype == torch.float16 and d == 64
            heur = decode_split_heuristic(d)
            launchable = DECODE_SPLIT.launchable(dtype, d, arch, heur)
            for has_new in (True, False):
                for direct in (False, True):
                    if not (full or (has_new and not direct) or gpt2):
                        continue
                    every = full or (gpt2 and has_new and not direct)
                    for cfg in launchable if every else [heur]:
                        consts = dict(
                            HEAD_DIM=d, HAS_NEW=has_new, DIRECT=direct, stride_kd=1, stride_vd=1, **cfg.kwargs
                        )
                        types = dict(Q=ptr, Kc=ptr, Vc=ptr, Knew=ptr, Vnew=ptr, Seqlens="*i32", O=ptr)
                        types.update(Opart="*fp32", Lse="*fp32", Counters="*i32", sm_scale="fp32", SPLIT_LEN="i32")
                        types.update(NUM_SPLITS="i32")
                        types.update(SPLIT_BUCKET="i32")
                        names = _decode_split_kernel.arg_names
                        types.update({n: "i32" for n in names if n.startswith("stride") or n in ("H", "T_max")})
                        sig = signature(
                            _decode_split_kernel, {k: v for k, v in types.items() if k not in consts}, consts
                        )
                        bn, w, s = DECODE_SPLIT.tile(cfg)
                        is_heur = DECODE_SPLIT.tile(cfg) == DECODE_SPLIT.tile(heur)
                        label = f"{tname} D={d} new={int(has_new)} direct={int(direct)} BLOCK_N={bn} w={w} s={s}"
                        case = CompileCase("decode_split", _decode_split_kernel, sig, consts, w, s, label, is_heur)
                        cases.append(case)
    return cases
