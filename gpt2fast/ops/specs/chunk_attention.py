"""``chunk_attention``: a chunk of new queries per sequence against a KV cache, appending the chunk's keys/values.

``flash_attn_with_kvcache`` semantics with ``causal=True`` and ``T_q >= 1``: the chunk's ``k_new``/``v_new``
are written into the caches at positions ``cache_seqlens[b] ... cache_seqlens[b] + T - 1``, and query ``i``
attends to the cached prefix and causally to the chunk, i.e. positions ``0 ... cache_seqlens[b] + i``.
It is what chunked prefill needs (``gpt2fast.serve``): a long prompt enters the cache a chunk at a time
while other sequences keep decoding.  With ``T = 1`` it is :func:`gpt2fast.ops.decode_attention` with an append.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, View, seeded_randn

MUTATES = ("k_cache", "v_cache")  # the append writes the caches in place
ARGS = ("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "scale")


def chunk_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    scale: float | None = None,
    backend: str | None = None,
    check_seqlens: bool = True,
) -> torch.Tensor:
    """Attention of a chunk of ``T`` queries per sequence over its cached prefix and, causally, the chunk.

    ``q``, ``k_new`` and ``v_new`` are [B, H, T, D]; the caches are [B, H, T_max, D]; ``cache_seqlens`` is
    int32 [B], the cached length of each sequence.  ``k_new``/``v_new`` are written into the caches at
    ``cache_seqlens[b] + i`` and query ``i`` attends to positions ``0 ... cache_seqlens[b] + i``.
    ``cache_seqlens`` is not modified.  Returns [B, H, T, D].

    The values of ``cache_seqlens`` are range-checked (``0 <= cache_seqlens[b]`` and ``cache_seqlens[b] + T
    <= T_max``), which reads them back to the host; a caller that guarantees it passes ``check_seqlens=False``.
    """
    validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, check_seqlens)
    return dispatch("chunk_attention", backend, (q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale), q.device)


def validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, check_seqlens=True) -> None:
    """The checks every backend relies on.  The values of ``cache_seqlens`` are checked too (a device-to-host
    copy) unless ``check_seqlens`` is False or a CUDA graph is being captured, where the caller owns them."""
    v.check_float("q", q)
    v.check_rank("q", q, 4, "[B, H, T, D]")
    v.check_nonempty("q", q)
    v.check_float("k_cache", k_cache)
    v.check_rank("k_cache", k_cache, 4, "[B, H, T_max, D]")
    if k_new is None or v_new is None:
        raise ValueError("k_new and v_new are required: the chunk's keys and values are appended to the caches")
    v.check_same("q", q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    b, h, t, d = q.shape
    t_max = k_cache.shape[2]
    v.check_shape("k_cache", k_cache, (b, h, t_max, d))
    v.check_shape("v_cache", v_cache, (b, h, t_max, d))
    v.check_shape("k_new", k_new, (b, h, t, d))
    v.check_shape("v_new", v_new, (b, h, t, d))
    if t > t_max:
        raise ValueError(f"the chunk has T = {t} tokens but the caches hold only T_max = {t_max} positions")
    v.check_writable_caches(k_cache, v_cache, "the chunk is written into the cache in place")
    v.check_cache_seqlens(cache_seqlens, b, q)
    v.check_scale(scale)
    hi = v.longest_seqlen(cache_seqlens, check_seqlens)
    if hi is None:
        return
    if hi + t > t_max:
        raise ValueError(f"cache_seqlens has length {hi}: appending a chunk of {t} would overflow the cache "
                         f"(T_max = {t_max})")  # fmt: skip


def positions(cache_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """The cache positions ``[B, T]`` (int64) a chunk of ``t`` tokens is written to."""
    return cache_seqlens.long()[:, None] + torch.arange(t, device=cache_seqlens.device)


def append_chunk(k_cache, v_cache, cache_seqlens, k_new, v_new) -> torch.Tensor:
    """Write ``k_new``/``v_new`` ([B, H, T, D]) into the caches at ``cache_seqlens[b] + i``; returns the
    positions ``[B, T]``."""
    pos = positions(cache_seqlens, k_new.shape[2])  # [B, T]
    rows = torch.arange(k_new.shape[0], device=k_new.device)[:, None]  # [B, 1]
    k_cache[rows, :, pos] = k_new.transpose(1, 2)  # indexed as [B, T, H, D]
    v_cache[rows, :, pos] = v_new.transpose(1, 2)
    return pos


def reference(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale=None):
    """Write the chunk into the caches, then attend to each query's prefix (masked softmax over T_max)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t_max = k_cache.shape[2]
    pos = append_chunk(k_cache, v_cache, cache_seqlens, k_new, v_new)  # [B, T]
    scores = torch.matmul(q, k_cache.transpose(-1, -2)) * scale  # [B, H, T, T_max]
    visible = torch.arange(t_max, device=q.device)[None, None, :] <= pos[:, :, None]  # [B, T, T_max]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v_cache)


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def seqlens_of(shape: dict) -> list[int]:
    """The cached lengths of a shape: ``seqlens`` if given, else seeded-random in [0, t_max - seq]."""
    if "seqlens" in shape:
        return list(shape["seqlens"])
    rng = random.Random(4321 + shape["batch"])
    return [rng.randrange(0, shape["t_max"] - shape["seq"] + 1) for _ in range(shape["batch"])]


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``batch``, ``heads``, ``seq`` (the chunk), ``t_max``, ``head_dim``, optional ``seqlens``
    (default seeded-random), ``scale``, ``std``."""
    randn = seeded_randn(gen, device, dtype)
    b, h, t, d, t_max = shape["batch"], shape["heads"], shape["seq"], shape["head_dim"], shape["t_max"]
    std = shape.get("std", 1.0)
    return dict(
        q=randn(b, h, t, d, std=std),
        k_cache=randn(b, h, t_max, d, std=std),
        v_cache=randn(b, h, t_max, d),
        cache_seqlens=torch.tensor(seqlens_of(shape), dtype=torch.int32, device=device),
        k_new=randn(b, h, t, d, std=std),
        v_new=randn(b, h, t, d),
        scale=shape.get("scale"),
    )


def _shape(b, h, t, t_max, d, seqlens, **extra) -> dict:
    return dict(batch=b, heads=h, seq=t, t_max=t_max, head_dim=d, seqlens=tuple(seqlens), **extra)


TEST_SHAPES = (
    _shape(3, 2, 5, 40, 64, [0, 17, 35]),  # an empty prefix, some, the chunk filling the cache
    _shape(2, 1, 1, 9, 32, [0, 8]),  # T = 1: decode with an append
    _shape(1, 2, 33, 33, 64, [0]),  # the whole cache in one chunk: plain causal attention
    _shape(2, 3, 16, 50, 128, [34, 3], scale=0.2),
    _shape(1, 1, 7, 64, 32, [50]),
)
GPU_SHAPES = (
    _shape(1, 12, 512, 1024, 64, [512]),
    _shape(4, 12, 256, 2048, 64, [0, 700, 1500, 1792]),
    _shape(2, 25, 129, 4096, 64, [3967, 1000]),
)


def shape_strategy(size: int):
    """Hypothesis: B <= 3, chunks of 1..32·size over caches of up to 64·size, prefixes from empty to full."""
    from hypothesis import strategies as st

    @st.composite
    def shapes(draw):
        b, h = draw(st.integers(1, 3)), draw(st.integers(1, 2 * size))
        t_max = draw(st.integers(1, 64 * size))
        t = draw(st.integers(1, min(t_max, 32 * size)))
        hi = t_max - t
        seqlens = draw(st.lists(st.one_of(st.just(0), st.just(hi), st.integers(0, hi)), min_size=b, max_size=b))
        d = draw(st.sampled_from([32, 64, 128]))
        scale = draw(st.one_of(st.none(), st.floats(0.02, 1.0)))
        return _shape(b, h, t, t_max, d, seqlens, scale=scale)

    return shapes()


def invariants(shape: dict, inputs: Inputs, outputs: list[torch.Tensor]) -> None:
    """The first query of a sequence with an empty prefix sees only itself: its output is exactly its value."""
    for i, n in enumerate(inputs["cache_seqlens"].tolist()):
        if n == 0:
            assert torch.equal(outputs[0][i, :, 0], inputs["v_new"][i, :, 0]), f"sequence {i}: first query != v_new"


def _projection_views(inputs: Inputs) -> Inputs:
    """q, k_new and v_new as the model passes them: [B, H, T, D] views of one [B, T, 3, H, D] projection."""
    qkv = torch.stack([inputs[n].transpose(1, 2) for n in ("q", "k_new", "v_new")], dim=2)  # [B, T, 3, H, D]
    q, kn, vn = (x.transpose(1, 2) for x in qkv.unbind(2))
    return dict(inputs, q=q, k_new=kn, v_new=vn)


def _slot_rows(inputs: Inputs) -> Inputs:
    """Caches that are rows of a bigger slot pool (the serving engine's per-slot views)."""
    out = dict(inputs)
    for name in ("k_cache", "v_cache"):
        c = inputs[name]
        pool = torch.zeros(c.shape[0] + 2, *c.shape[1:], dtype=c.dtype, device=c.device)
        pool[1 : 1 + c.shape[0]] = c
        out[name] = pool[1 : 1 + c.shape[0]]
    return out


VIEWS = (View("projection-views", _projection_views), View("slot-rows", _slot_rows))


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(*, b=2, h=2, t=3, t_max=8, d=32, seqlens=(0, 5), device="cpu", **over) -> Inputs:
    rn = lambda *shape: _rn(*shape, device=device)
    kw = dict(q=rn(b, h, t, d), k_cache=rn(b, h, t_max, d), v_cache=rn(b, h, t_max, d),
              cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device), k_new=rn(b, h, t, d),
              v_new=rn(b, h, t, d), scale=None)  # fmt: skip
    kw.update(over)
    return kw


EDGE_INPUTS = (
    EdgeInput("chunk-head-dim-16", "head dim 16", lambda d: _args(d=16, device=d)),
    EdgeInput("chunk-cache-slice", "caches sliced along T_max (big[:, :, :8])",
              lambda d: _args(k_cache=_rn(2, 2, 12, 32, device=d)[:, :, :8],
                              v_cache=_rn(2, 2, 12, 32, device=d)[:, :, :8], device=d)),
    EdgeInput("chunk-q-strided", "q[..., ::2] (last-dim stride 2)",
              lambda d: _args(q=_rn(2, 2, 3, 64, device=d)[..., ::2], device=d)),
)  # fmt: skip


BAD_INPUTS = (
    BadInput("chunk-q-rank", "q 3-D", lambda: _args(q=_rn(2, 2, 32)),
             ValueError, r"q must be 4-D \[B, H, T, D\], got shape \[2, 2, 32\]"),
    BadInput("chunk-no-knew", "k_new=None", lambda: _args(k_new=None),
             ValueError, r"k_new and v_new are required"),
    BadInput("chunk-knew-shape", "k_new with another T", lambda: _args(k_new=_rn(2, 2, 4, 32)),
             ValueError, r"k_new must have shape \[2, 2, 3, 32\], got \[2, 2, 4, 32\]"),
    BadInput("chunk-vcache-shape", "v_cache with another T_max", lambda: _args(v_cache=_rn(2, 2, 9, 32)),
             ValueError, r"v_cache must have shape \[2, 2, 8, 32\], got \[2, 2, 9, 32\]"),
    BadInput("chunk-longer-than-cache", "a chunk of 9 for T_max 8",
             lambda: _args(t=9, seqlens=(0, 0)),
             ValueError, r"the chunk has T = 9 tokens but the caches hold only T_max = 8 positions"),
    BadInput("chunk-seqlens-int64", "cache_seqlens int64", lambda: _args(cache_seqlens=torch.tensor([0, 5])),
             TypeError, r"cache_seqlens must be int32, got torch\.int64"),
    BadInput("chunk-seqlens-list", "cache_seqlens a list", lambda: _args(cache_seqlens=[0, 5]),
             TypeError, r"cache_seqlens must be an int32 torch\.Tensor, got list"),
    BadInput("chunk-seqlens-negative", "cache_seqlens [-1, 5]", lambda: _args(seqlens=(-1, 5)),
             ValueError, r"cache_seqlens has a negative length \(-1\)"),
    BadInput("chunk-overflow", "cache_seqlens 6 + a chunk of 3 > T_max 8", lambda: _args(seqlens=(0, 6)),
             ValueError, r"cache_seqlens has length 6: appending a chunk of 3 would overflow the cache \(T_max = 8\)"),
    BadInput("chunk-mixed-dtype", "k_cache bf16 with q fp32",
             lambda: _args(k_cache=_rn(2, 2, 8, 32, dtype=torch.bfloat16)),
             TypeError, r"k_cache has dtype torch\.bfloat16 but q has torch\.float32; they must match"),
    BadInput("chunk-expanded-cache", "an expand()-ed k_cache",
             lambda: _args(k_cache=_rn(2, 2, 1, 32).expand(2, 2, 8, 32)),
             ValueError, r"k_cache has overlapping strides \(.*\) for shape \[2, 2, 8, 32\]"),
    BadInput("chunk-batch0", "batch of 0", lambda: _args(b=0, seqlens=()),
             ValueError, r"q is empty \(shape \[0, 2, 3, 32\]\); every dimension must be >= 1"),
    BadInput("chunk-scale-neg", "scale=-1", lambda: _args(scale=-1.0),
             ValueError, r"scale must be None or a positive finite number, got -1\.0"),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
def bench_cases(sweep: str) -> list[BenchCase]:
    """Chunks of 64..512 prompt tokens at GPT-2 small's 12 heads, behind prefixes of 0..3584 cached tokens."""
    if sweep == "cpu":
        return [BenchCase("chunk_attention", _shape(1, 2, t, 64, 64, [64 - t]), "seq", "B=1 H=2") for t in (1, 16)]
    chunks = [64, 128, 256, 512] if sweep == "full" else [128, 512]
    prefixes = [0, 512, 1536, 3584] if sweep == "full" else [0, 1536]
    return [
        BenchCase("chunk_attention", _shape(1, 12, t, 4096, 64, [p]), "seq", f"B=1 H=12 prefix={p}")
        for p in prefixes for t in chunks
    ]  # fmt: skip


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read q, the chunk's k/v and the cached prefix, write the output and the chunk into the cache."""
    s = torch.empty((), dtype=dtype).element_size()
    h, t, d = shape["heads"], shape["seq"], shape["head_dim"]
    seqlens = seqlens_of(shape)
    chunk = h * t * d * s  # one [H, T, D] tensor of one sequence
    prefix = sum(2 * h * n * d * s for n in seqlens)
    keys = sum(n * t + t * (t + 1) / 2 for n in seqlens)  # attended (query, key) pairs
    return Traffic(prefix + len(seqlens) * 6 * chunk, 4.0 * h * d * keys, {"kv_bytes": prefix})


def baselines(device: torch.device) -> dict:
    """Append, then SDPA with a boolean mask over the whole cache (transformers' static-cache prefill)."""

    def sdpa_static_cache(inp: Inputs):
        q, kc, vc, lens, kn, vn, scale = (inp[a] for a in ARGS)
        t_max = kc.shape[2]

        def run():
            pos = append_chunk(kc, vc, lens, kn, vn)
            mask = torch.arange(t_max, device=q.device)[None, None, :] <= pos[:, :, None]
            return F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask[:, None], scale=scale)

        return run

    return {"torch.sdpa": sdpa_static_cache}


register_op(OpSpec.from_module(__name__))
