"""Beam-search KV-cache reorder as one Triton kernel, in place, without a scratch buffer.

One program per (beam group, layer·head, tile of positions).  It loads the source tile of every beam of its
group (``[BEAMS, BLOCK_T, D]`` for keys and values), waits at a barrier, then stores them into the
destination rows.  A program owns one (group, layer, head, position tile) for all the group's rows, so no
other program reads or writes those elements, and the barrier orders its own reads before its writes: a
permutation with cycles (two beams swapping rows) is safe in place.  Positions at or past a row's length and
rows that keep their own beam are masked off, so only the live prefixes of moved rows are read and written.
The grid depends only on shapes (``T_max``), never on lengths, so one launch is CUDA-graph capturable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.specs import reorder_cache as spec
from gpt2fast.ops.triton._common import TL_DTYPE, CompileCase, int32_span_reason, launch, next_pow2, signature

#: The most beams per group and the widest head the kernel keeps in registers.
MAX_BEAMS = 32
MAX_HEAD_DIM = 256
#: Elements of one tensor's tile (beams x positions x head dim) per program.
TILE_ELEMENTS = 2048


@triton.jit
def _reorder_cache_kernel(
    Kc, Vc, Seqlens, Src,
    stride_kl, stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vl, stride_vb, stride_vh, stride_vt, stride_vd,
    H, D, num_beams,
    BEAMS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(0)
    lh = tl.program_id(1)
    layer = (lh // H).to(tl.int64)
    head = (lh % H).to(tl.int64)
    beam = tl.arange(0, BEAMS)
    in_group = beam < num_beams
    rows = group.to(tl.int64) * num_beams + beam
    src = tl.load(Src + rows, mask=in_group, other=0)
    lens = tl.load(Seqlens + rows, mask=in_group, other=0)
    moved = in_group & (src != rows)
    t = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = moved[:, None, None] & (t[None, :, None] < lens[:, None, None]) & (d[None, None, :] < D)
    pos = t[None, :, None]
    col = d[None, None, :]
    k_in = layer * stride_kl + head * stride_kh + pos * stride_kt + col * stride_kd
    v_in = layer * stride_vl + head * stride_vh + pos * stride_vt + col * stride_vd
    k_src = Kc + k_in + src[:, None, None] * stride_kb
    v_src = Vc + v_in + src[:, None, None] * stride_vb
    k = tl.load(k_src, mask=mask)
    v = tl.load(v_src, mask=mask)
    tl.debug_barrier()  # every read of this program's elements happens before any write to them
    tl.store(Kc + k_in + rows[:, None, None] * stride_kb, k, mask=mask)
    tl.store(Vc + v_in + rows[:, None, None] * stride_vb, v, mask=mask)


def tile(num_beams: int, head_dim: int) -> tuple[int, int, int]:
    """``(BEAMS, BLOCK_T, BLOCK_D)``: the group and head padded to powers of two, and as many positions as keep
    one tensor's tile within :data:`TILE_ELEMENTS` (at least one)."""
    beams, block_d = next_pow2(num_beams), next_pow2(head_dim)
    return beams, max(1, min(64, TILE_ELEMENTS // (beams * block_d))), block_d


def num_warps(beams: int, block_t: int, block_d: int) -> int:
    """4 warps per :data:`TILE_ELEMENTS` elements of a tile (more only when one position of every beam is wider)."""
    return min(16, 4 * max(1, beams * block_t * block_d // TILE_ELEMENTS))


def supports(k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens, beam_idx, num_beams: int) -> str | None:
    """At most :data:`MAX_BEAMS` beams per group and a head dim up to :data:`MAX_HEAD_DIM`, with offsets inside one
    (layer, row, head) slice that fit in int32."""
    if num_beams > MAX_BEAMS:
        return f"triton reorder_cache supports at most {MAX_BEAMS} beams per group, got {num_beams}"
    if k_cache.shape[-1] > MAX_HEAD_DIM:
        return f"triton reorder_cache supports head dims up to {MAX_HEAD_DIM}, got {k_cache.shape[-1]}"
    return int32_span_reason("k_cache", k_cache, (3, 4)) or int32_span_reason("v_cache", v_cache, (3, 4))


@torch.library.custom_op("gpt2fast_triton::reorder_cache", mutates_args=spec.MUTATES, schema=spec.SCHEMA)
def reorder_cache_op(k_cache, v_cache, cache_seqlens, beam_idx, num_beams):
    """The in-place reorder; see the module docstring."""
    n_layer, b, h, t_max, d = k_cache.shape
    beams, block_t, block_d = tile(num_beams, d)
    grid = (b // num_beams, n_layer * h, triton.cdiv(t_max, block_t))
    args = (k_cache, v_cache, cache_seqlens, beam_idx, *k_cache.stride(), *v_cache.stride(), h, d, num_beams)
    consts = dict(BEAMS=beams, BLOCK_T=block_t, BLOCK_D=block_d)
    config = triton.Config({}, num_warps=num_warps(beams, block_t, block_d), num_stages=1)
    launch(_reorder_cache_kernel, None, grid, args, consts, config)


@reorder_cache_op.register_fake
def _(k_cache, v_cache, cache_seqlens, beam_idx, num_beams):
    return None


@register_impl("reorder_cache", "triton", supports=supports)
def reorder_cache(k_cache, v_cache, cache_seqlens, beam_idx, num_beams):
    """Copy each moved row's live prefix from its source row, in place, in one launch."""
    reorder_cache_op(k_cache, v_cache, cache_seqlens, beam_idx, num_beams)
    return k_cache, v_cache


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """Every launchable tile (a power-of-two group of 1..32 beams x head dims 32/64/128/256) for fp16, and GPT-2's
    head dim 64 for fp32/bf16 (every head dim if ``full``); one config each, the same on every target ``arch``.
    Unit last-dim strides are constexpr 1, as the JIT specialises them."""
    cases = []
    for dtype, tname in TL_DTYPE.items():
        ptr = "*" + tname
        for head_dim in (32, 64, 128, 256):
            if not (full or dtype == torch.float16 or head_dim == 64):
                continue
            for n in (1, 2, 4, 8, 16, 32):
                beams, block_t, block_d = tile(n, head_dim)
                # unit last-dim strides are constexpr 1, as the JIT specialises them
                consts = dict(BEAMS=beams, BLOCK_T=block_t, BLOCK_D=block_d, stride_kd=1, stride_vd=1)
                types = dict(Kc=ptr, Vc=ptr, Seqlens="*i32", Src="*i64", H="i32", D="i32", num_beams="i32")
                types.update({f"stride_{x}{y}": "i32" for x in "kv" for y in "lbht"})
                sig = signature(_reorder_cache_kernel, types, consts)
                warps = num_warps(beams, block_t, block_d)
                label = f"{tname} beams={beams} BLOCK_T={block_t} D={block_d} warps={warps}"
                cases.append(CompileCase("reorder_cache", _reorder_cache_kernel, sig, consts, warps, 1, label, True))
    return cases
