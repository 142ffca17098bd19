"""``decode_attention``: one query token per sequence against a KV cache (``flash_attn_with_kvcache`` semantics)."""

from __future__ import annotations

import importlib.util
import math
import random

import torch
import torch.nn.functional as F

from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, View, seeded_randn

MUTATES = ("k_cache", "v_cache")  # the append writes the caches in place
#: The ``torch.library`` schema of a backend's custom op taking the op's arguments (``scale`` resolved).
SCHEMA = (
    "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor? k_new, Tensor? v_new, "
    "float scale) -> Tensor"
)
ARGS = ("q", "k_cache", "v_cache", "cache_seqlens", "k_new", "v_new", "scale")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
    check_seqlens: bool = True,
) -> torch.Tensor:
    """Single-token attention against a KV cache (``flash_attn_with_kvcache`` semantics).

    ``q`` is [B, H, D]; the caches are [B, H, T_max, D]; ``cache_seqlens`` is int32 [B].
    When ``k_new``/``v_new`` ([B, H, D]) are given they are written into the caches at
    ``cache_seqlens[b]`` and attention covers ``cache_seqlens[b] + 1`` positions.
    ``cache_seqlens`` is not modified.  Returns [B, H, D]; a sequence that attends to nothing gets zeros.

    The values of ``cache_seqlens`` are range-checked, which reads them back to the host.  A caller
    that already guarantees ``0 <= cache_seqlens[b] (+1 when appending) <= T_max`` (the model does, with
    a host-side bound) passes ``check_seqlens=False`` to avoid that sync on every layer.
    """
    validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, check_seqlens)
    return dispatch("decode_attention", backend, (q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale), q.device)


def validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, check_seqlens=True) -> None:
    """The checks every backend relies on.  The values of ``cache_seqlens`` are checked too (a device-to-host
    copy) unless ``check_seqlens`` is False or a CUDA graph is being captured, where the caller owns them."""
    v.check_float("q", q)
    v.check_rank("q", q, 3, "[B, H, D]")
    v.check_nonempty("q", q)
    v.check_float("k_cache", k_cache)
    v.check_rank("k_cache", k_cache, 4, "[B, H, T_max, D]")
    v.check_same("q", q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    b, h, d = q.shape
    t_max = k_cache.shape[2]
    v.check_shape("k_cache", k_cache, (b, h, t_max, d))
    v.check_shape("v_cache", v_cache, (b, h, t_max, d))
    if t_max == 0:
        raise ValueError("k_cache has T_max = 0; the cache must hold at least one position")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together (both or neither)")
    if k_new is not None:
        v.check_shape("k_new", k_new, (b, h, d))
        v.check_shape("v_new", v_new, (b, h, d))
        v.check_writable_caches(k_cache, v_cache, "appending k_new/v_new writes the cache in place")
    v.check_cache_seqlens(cache_seqlens, b, q)
    v.check_scale(scale)
    hi = v.longest_seqlen(cache_seqlens, check_seqlens)
    if hi is None:
        return
    limit = t_max - 1 if k_new is not None else t_max
    if hi > limit:
        what = "appending k_new/v_new would overflow the cache" if k_new is not None else "exceeds the cache"
        raise ValueError(f"cache_seqlens has length {hi}: {what} (T_max = {t_max})")


def append_kv(k_cache, v_cache, cache_seqlens, k_new, v_new) -> None:
    """Write ``k_new``/``v_new`` ([B, H, D]) into the caches at position ``cache_seqlens[b]``."""
    b = torch.arange(k_cache.shape[0], device=k_cache.device)
    pos = cache_seqlens.long()
    k_cache[b, :, pos] = k_new
    v_cache[b, :, pos] = v_new


def reference(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, scale=None):
    """Append (when given), then attend to each sequence's first ``cache_seqlens[b]`` (+1) positions; an
    empty sequence gets a zero output."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lengths = cache_seqlens.long()
    if k_new is not None:
        append_kv(k_cache, v_cache, cache_seqlens, k_new, v_new)
        lengths = lengths + 1
    t_max = k_cache.shape[2]
    scores = torch.einsum("bhd,bhtd->bht", q, k_cache) * scale
    valid = torch.arange(t_max, device=q.device)[None, :] < lengths[:, None]  # [B, T_max]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row is all -inf -> NaN -> 0
    return torch.einsum("bht,bhtd->bhd", probs, v_cache)


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def seqlens_of(shape: dict) -> list[int]:
    """The cached lengths of a shape: ``seqlens`` if given, else all ``cache_len``, or seeded-random in
    [0, cache_len) when ``ragged``."""
    if "seqlens" in shape:
        return list(shape["seqlens"])
    if not shape.get("ragged"):
        return [shape["cache_len"]] * shape["batch"]
    rng = random.Random(1234 + shape["batch"])
    return [rng.randrange(0, shape["cache_len"]) for _ in range(shape["batch"])]


def t_max_of(shape: dict) -> int:
    """Cache positions: ``t_max`` if given, else ``cache_len`` plus the slot the appended token needs."""
    return shape["t_max"] if "t_max" in shape else shape["cache_len"] + 1


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``batch``, ``heads``, ``head_dim``, ``append`` (default True), ``t_max`` and ``seqlens``, or
    ``cache_len`` (+ ``ragged``); optional ``scale``, ``std``."""
    randn = seeded_randn(gen, device, dtype)
    b, h, d, t_max = shape["batch"], shape["heads"], shape["head_dim"], t_max_of(shape)
    append, std = shape.get("append", True), shape.get("std", 1.0)
    return dict(
        q=randn(b, h, d, std=std),
        k_cache=randn(b, h, t_max, d, std=std),
        v_cache=randn(b, h, t_max, d),
        cache_seqlens=torch.tensor(seqlens_of(shape), dtype=torch.int32, device=device),
        k_new=randn(b, h, d, std=std) if append else None,
        v_new=randn(b, h, d) if append else None,
        scale=shape.get("scale"),
    )


def _shape(b, h, t_max, d, seqlens, append, **extra) -> dict:
    return dict(batch=b, heads=h, t_max=t_max, head_dim=d, seqlens=tuple(seqlens), append=append, **extra)


TEST_SHAPES = (
    _shape(4, 2, 40, 64, [0, 1, 17, 39], True),  # ragged: empty, one, some, the last free slot
    _shape(4, 2, 40, 64, [0, 1, 17, 40], False),  # ragged, a full cache, an empty sequence
    _shape(3, 2, 50, 32, [49, 0, 23], True, scale=0.2),
    _shape(2, 3, 16, 128, [0, 0], False),  # nothing to attend: zeros
    _shape(1, 1, 1, 32, [0], True),  # T_max = 1, batch 1
    _shape(2, 1, 33, 64, [33, 32], False),  # T_max not a multiple of a tile, full
)
GPU_SHAPES = (
    _shape(1, 12, 4096, 64, [4095], True),
    _shape(32, 24, 4096, 64, [4095, *range(0, 4095, 132)][:32], True),
    _shape(64, 12, 300, 64, [299] + [i * 4 for i in range(63)], True),
    _shape(4096, 17, 16, 32, [15] * 4096, True),  # B·H beyond CUDA's 65535 grid limit of dims 1 and 2
)


def shape_strategy(size: int):
    """Hypothesis: ragged lengths that include 0 and a full cache often, every head dim, append or not."""
    from hypothesis import strategies as st

    @st.composite
    def shapes(draw):
        b, h = draw(st.integers(1, 3)), draw(st.integers(1, 2 * size))
        t_max, append = draw(st.integers(1, 64 * size)), draw(st.booleans())
        hi = t_max - 1 if append else t_max  # appending needs one free slot
        lengths = st.one_of(st.just(0), st.just(hi), st.integers(0, hi))
        seqlens = draw(st.lists(lengths, min_size=b, max_size=b))
        d = draw(st.sampled_from([32, 64, 128]))
        scale = draw(st.one_of(st.none(), st.floats(0.02, 1.0)))
        return _shape(b, h, t_max, d, seqlens, append, scale=scale)

    return shapes()


def invariants(shape: dict, inputs: Inputs, outputs: list[torch.Tensor]) -> None:
    """A sequence with nothing to attend to (length 0, no append) gets an exactly zero output."""
    if inputs["k_new"] is None:
        for i, n in enumerate(inputs["cache_seqlens"].tolist()):
            assert n != 0 or torch.count_nonzero(outputs[0][i]) == 0, f"sequence {i} attends to nothing, not zero"


def _projection_views(inputs: Inputs) -> Inputs:
    """q, k_new and v_new as the model passes them: [B, H, D] slices of one [B, 3, H, D] projection."""
    if inputs["k_new"] is None:
        return inputs
    qkv = torch.stack([inputs["q"], inputs["k_new"], inputs["v_new"]], dim=1)  # [B, 3, H, D]
    q, kn, vn = qkv.unbind(1)
    return dict(inputs, q=q, k_new=kn, v_new=vn)


def _cache_slices(inputs: Inputs) -> Inputs:
    """Caches that are the first T_max positions of bigger ones (strides follow, appends land in the view)."""
    out = dict(inputs)
    for name in ("k_cache", "v_cache"):
        c = inputs[name]
        big = torch.zeros(*c.shape[:2], c.shape[2] + 7, c.shape[3], dtype=c.dtype, device=c.device)
        big[:, :, : c.shape[2]] = c
        out[name] = big[:, :, : c.shape[2]]
    return out


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(*, b=2, h=2, t=8, d=32, seqlens=(3, 5), append=True, device="cpu", **over) -> Inputs:
    kw = dict(q=_rn(b, h, d, device=device), k_cache=_rn(b, h, t, d, device=device),
              v_cache=_rn(b, h, t, d, device=device))  # fmt: skip
    kw["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32, device=device)
    kw["k_new"], kw["v_new"] = (_rn(b, h, d, device=device), _rn(b, h, d, device=device)) if append else (None, None)
    kw["scale"] = None
    kw.update(over)
    return kw


def _expanded(device="cpu") -> torch.Tensor:
    """A [2, 2, 8, 32] cache whose 8 positions alias one row (an ``expand``-ed view)."""
    return _rn(2, 2, 1, 32, device=device).expand(2, 2, 8, 32)


EDGE_INPUTS = (
    EdgeInput("dec-expanded-read", "read-only decode from an expand()-ed k_cache",
              lambda d: _args(k_cache=_expanded(d), append=False, device=d)),
    EdgeInput("dec-head-dim-16", "head dim 16", lambda d: _args(d=16, device=d)),
    EdgeInput("dec-cache-slice", "caches sliced along T_max (big[:, :, :8])",
              lambda d: _args(k_cache=_rn(2, 2, 12, 32, device=d)[:, :, :8],
                              v_cache=_rn(2, 2, 12, 32, device=d)[:, :, :8], device=d)),
    EdgeInput("dec-q-strided", "q[..., ::2] (last-dim stride 2)",
              lambda d: _args(q=_rn(2, 2, 64, device=d)[..., ::2], device=d)),
)  # fmt: skip

BAD_INPUTS = (
    BadInput("dec-q-rank", "q 4-D", lambda: _args(q=_rn(2, 2, 1, 32)),
             ValueError, r"q must be 3-D \[B, H, D\], got shape \[2, 2, 1, 32\]"),
    BadInput("dec-kcache-rank", "k_cache 3-D", lambda: _args(k_cache=_rn(2, 2, 8)),
             ValueError, r"k_cache must be 4-D \[B, H, T_max, D\], got shape \[2, 2, 8\]"),
    BadInput("dec-seqlens-int64", "cache_seqlens int64", lambda: _args(cache_seqlens=torch.tensor([3, 5])),
             TypeError, r"cache_seqlens must be int32, got torch\.int64"),
    BadInput("dec-seqlens-list", "cache_seqlens a list", lambda: _args(cache_seqlens=[3, 5]),
             TypeError, r"cache_seqlens must be an int32 torch\.Tensor, got list"),
    BadInput("dec-seqlens-len", "cache_seqlens of length 3 for B=2",
             lambda: _args(cache_seqlens=torch.tensor([1, 2, 3], dtype=torch.int32)),
             ValueError, r"cache_seqlens must have shape \[2\], got \[3\]"),
    BadInput("dec-seqlens-device", "cache_seqlens on another device (meta)",
             lambda: _args(cache_seqlens=torch.zeros(2, dtype=torch.int32, device="meta")),
             RuntimeError, r"cache_seqlens is on meta but q is on cpu"),
    BadInput("dec-seqlens-negative", "cache_seqlens [-1, 5]", lambda: _args(seqlens=(-1, 5)),
             ValueError, r"cache_seqlens has a negative length \(-1\)"),
    BadInput("dec-seqlens-over", "cache_seqlens 9 > T_max 8 (no append)", lambda: _args(seqlens=(2, 9), append=False),
             ValueError, r"cache_seqlens has length 9: exceeds the cache \(T_max = 8\)"),
    BadInput("dec-append-overflow", "append at cache_seqlens = T_max (a full cache)", lambda: _args(seqlens=(8, 0)),
             ValueError, r"cache_seqlens has length 8: appending k_new/v_new would overflow the cache \(T_max = 8\)"),
    BadInput("dec-knew-alone", "k_new without v_new", lambda: _args(v_new=None),
             ValueError, r"k_new and v_new must be given together \(both or neither\)"),
    BadInput("dec-knew-shape", "k_new [2, 2, 31] for head dim 32",
             lambda: _args(k_new=_rn(2, 2, 31), v_new=_rn(2, 2, 31)),
             ValueError, r"k_new must have shape \[2, 2, 32\], got \[2, 2, 31\]"),
    BadInput("dec-vcache-shape", "v_cache with another T_max", lambda: _args(v_cache=_rn(2, 2, 9, 32)),
             ValueError, r"v_cache must have shape \[2, 2, 8, 32\], got \[2, 2, 9, 32\]"),
    BadInput("dec-tmax0", "caches with T_max = 0", lambda: _args(t=0, seqlens=(0, 0), append=False),
             ValueError, r"k_cache has T_max = 0; the cache must hold at least one position"),
    BadInput("dec-batch0", "batch of 0", lambda: _args(b=0, seqlens=()),
             ValueError, r"q is empty \(shape \[0, 2, 32\]\); every dimension must be >= 1"),
    BadInput("dec-mixed-dtype", "k_cache bf16 with q fp32",
             lambda: _args(k_cache=_rn(2, 2, 8, 32, dtype=torch.bfloat16)),
             TypeError, r"k_cache has dtype torch\.bfloat16 but q has torch\.float32; they must match"),
    BadInput("dec-expanded-append", "append into an expand()-ed k_cache (silently corrupted it before)",
             lambda: _args(k_cache=_expanded()),
             ValueError, r"k_cache has overlapping strides \(.*\) for shape \[2, 2, 8, 32\]"),
    BadInput("dec-scale-nan", "scale=nan", lambda: _args(scale=math.nan),
             ValueError, r"scale must be None or a positive finite number, got nan"),
)  # fmt: skip

VIEWS = (View("projection-views", _projection_views), View("cache-slices", _cache_slices))


# ---- benchmarks ---------------------------------------------------------------------------------------------
def _bench(batch, heads, cache_len, sweep, group, ragged=False, target=False) -> BenchCase:
    shape = dict(batch=batch, heads=heads, cache_len=cache_len, head_dim=64, ragged=ragged)
    return BenchCase("decode_attention", shape, sweep, group, target=target or cache_len >= 4096)


def bench_cases(sweep: str) -> list[BenchCase]:
    """Cache lengths 128..8192 at GPT-2 small/xl head counts, batch sweeps, and ragged batches."""
    if sweep == "full":
        lens = [128, 512, 1024, 2048, 4096, 8192]
        c = [_bench(8, 12, n, "cache_len", "B=8 H=12") for n in lens]
        c += [_bench(1, 25, n, "cache_len", "B=1 H=25") for n in lens]
        c += [_bench(b, 12, 1024, "batch", "L=1024 H=12") for b in (1, 4, 16, 64, 256)]
        return c + [_bench(b, 12, 8192, "batch", "ragged Lmax=8192 H=12", True) for b in (4, 16, 64, 256)]
    if sweep == "quick":
        c = [_bench(8, 12, n, "cache_len", "B=8 H=12") for n in (512, 2048, 8192)]
        c += [_bench(b, 12, 1024, "batch", "L=1024 H=12") for b in (1, 64, 256)]
        return [*c, _bench(64, 12, 8192, "batch", "ragged Lmax=8192 H=12", True)]
    c = [_bench(2, 2, n, "cache_len", "B=2 H=2") for n in (0, 16, 33)]
    return [*c, _bench(3, 2, 40, "batch", "ragged Lmax=40 H=2", True)]


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read q and the cached K/V of every attended position, write the output; appending also reads
    k_new/v_new and writes them into the cache.  ``kv_bytes`` is the cache part alone."""
    s = torch.empty((), dtype=dtype).element_size()
    seqlens, h, d = seqlens_of(shape), shape["heads"], shape["head_dim"]
    append = shape.get("append", True)
    small = len(seqlens) * h * d * s  # one [B, H, D] tensor
    kv = 2 * h * d * sum(seqlens) * s
    nbytes = kv + 2 * small + (4 * small if append else 0)
    flops = 4.0 * h * d * (sum(seqlens) + (len(seqlens) if append else 0))
    return Traffic(nbytes, flops, {"kv_bytes": kv})


CHECK_BATCH = 8


def check_inputs(shape: dict, inputs: Inputs) -> Inputs:
    """The first 8 sequences."""
    return {k: (t[:CHECK_BATCH] if isinstance(t, torch.Tensor) else t) for k, t in inputs.items()}


def check_outputs(shape: dict, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same sequences."""
    return [o[:CHECK_BATCH] for o in outputs]


def baselines(device: torch.device) -> dict:
    """What transformers' static cache does (append, then masked SDPA over the whole cache), and flash_attn's
    ``flash_attn_with_kvcache`` when installed."""

    def sdpa_static_cache(inp: Inputs):
        q, kc, vc, lens, kn, vn, scale = (inp[a] for a in ARGS)
        pos = torch.arange(kc.shape[2], device=q.device)

        def run():
            if kn is not None:
                append_kv(kc, vc, lens, kn, vn)
            n = lens if kn is None else lens + 1
            mask = (pos[None, :] < n[:, None])[:, None, None, :]  # [B, 1, 1, T_max]
            return F.scaled_dot_product_attention(q[:, :, None], kc, vc, attn_mask=mask, scale=scale)[:, :, 0]

        return run

    def flash_attn_kvcache(inp: Inputs):
        from flash_attn import flash_attn_with_kvcache

        q = inp["q"][:, None]  # [B, 1, H, D]
        kc, vc = (inp[n].transpose(1, 2).contiguous() for n in ("k_cache", "v_cache"))  # [B, T, H, D]
        kn = None if inp["k_new"] is None else inp["k_new"][:, None]
        vn = None if inp["v_new"] is None else inp["v_new"][:, None]
        lens, scale = inp["cache_seqlens"], inp["scale"]
        return lambda: flash_attn_with_kvcache(
            q, kc, vc, k=kn, v=vn, cache_seqlens=lens, softmax_scale=scale, causal=True
        )[:, 0]

    out: dict = {"torch.sdpa": sdpa_static_cache}
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        out["flash_attn"] = flash_attn_kvcache
    return out


register_op(OpSpec.from_module(__name__))
