"""``reorder_cache``: beam search's KV-cache reselection, in place, copying only each row's live prefix.

Beams are rows of the static KV cache ``[n_layer, B, H, T_max, D]``, in groups of ``num_beams`` consecutive
rows (one group per prompt).  After a beam-search step, row ``r`` must continue the beam that was in row
``beam_idx[r]`` (a row of the same group): its first ``cache_seqlens[r]`` positions are replaced by those of
row ``beam_idx[r]``, in every layer and head, for keys and values.  Positions past ``cache_seqlens[r]`` are
left as they are (they are dead: attention never reads them), which is what makes this cheaper than
gathering whole rows, and rows with ``beam_idx[r] == r`` are not touched at all.
"""

from __future__ import annotations

import random

import torch

from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, seeded_randn

MUTATES = ("k_cache", "v_cache")
ARGS = ("k_cache", "v_cache", "cache_seqlens", "beam_idx", "num_beams")
#: The ``torch.library`` schema of a backend's custom op taking the op's arguments (it returns nothing).
SCHEMA = "(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor cache_seqlens, Tensor beam_idx, int num_beams) -> ()"


def reorder_cache(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    beam_idx: torch.Tensor,
    num_beams: int,
    backend: str | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder the rows of a KV cache in place: row ``r`` takes the first ``cache_seqlens[r]`` positions of row
    ``beam_idx[r]``, which must lie in ``r``'s group of ``num_beams`` consecutive rows.

    ``k_cache``/``v_cache`` are ``[n_layer, B, H, T_max, D]``; ``cache_seqlens`` int32 ``[B]``; ``beam_idx``
    int64 ``[B]``.  Returns ``(k_cache, v_cache)`` (the same tensors).  The values of ``cache_seqlens`` and
    ``beam_idx`` are range-checked, which reads them back to the host; a caller that guarantees them (beam
    search does) passes ``check_values=False``, so the op has no host sync and can be captured in a CUDA graph.
    """
    validate(k_cache, v_cache, cache_seqlens, beam_idx, num_beams, check_values)
    return dispatch("reorder_cache", backend, (k_cache, v_cache, cache_seqlens, beam_idx, num_beams), k_cache.device)


def validate(k_cache, v_cache, cache_seqlens, beam_idx, num_beams, check_values=True) -> None:
    """The checks every backend relies on (values too unless ``check_values`` is False or a CUDA graph is being
    captured)."""
    v.check_float("k_cache", k_cache)
    v.check_rank("k_cache", k_cache, 5, "[n_layer, B, H, T_max, D]")
    v.check_nonempty("k_cache", k_cache)
    v.check_same("k_cache", k_cache, v_cache=v_cache)
    v.check_shape("v_cache", v_cache, tuple(k_cache.shape))
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if v.has_internal_overlap(cache):
            raise ValueError(
                f"{name} has overlapping strides {tuple(cache.stride())} for shape {v.fmt(cache.shape)} (e.g. an "
                "expand()-ed view); the reorder writes the cache in place, so pass a tensor with distinct memory per "
                "element"
            )
    if k_cache.data_ptr() == v_cache.data_ptr():
        raise ValueError("k_cache and v_cache are the same tensor; pass the keys and the values")
    b, t_max = k_cache.shape[1], k_cache.shape[3]
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if b % num_beams:
        raise ValueError(f"the cache's batch {b} is not a multiple of num_beams={num_beams}")
    for name, t, dtype in (("cache_seqlens", cache_seqlens, torch.int32), ("beam_idx", beam_idx, torch.int64)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a {dtype} torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
        v.check_shape(name, t, (b,))
        if t.device != k_cache.device:
            raise RuntimeError(f"{name} is on {t.device} but k_cache is on {k_cache.device}")
    if not check_values or (k_cache.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < 0 or hi > t_max:
        raise ValueError(f"cache_seqlens must lie in [0, T_max={t_max}], got {lo}..{hi}")
    rows = torch.arange(b, device=beam_idx.device)
    outside = (beam_idx < 0) | (beam_idx >= b) | (beam_idx // num_beams != rows // num_beams)
    if bool(outside.any()):
        r = int(outside.nonzero()[0, 0])
        raise ValueError(
            f"beam_idx[{r}] = {int(beam_idx[r])} is not a row of row {r}'s group of num_beams={num_beams} rows"
        )


def reference(k_cache, v_cache, cache_seqlens, beam_idx, num_beams):
    """Gather every row from its source, then keep the gathered values inside each row's live prefix (whole
    rows are read: the oracle is plain, not frugal)."""
    t_max = k_cache.shape[3]
    live = torch.arange(t_max, device=k_cache.device)[None, :] < cache_seqlens.long()[:, None]  # [B, T_max]
    live = live[None, :, None, :, None]
    for cache in (k_cache, v_cache):
        cache.copy_(torch.where(live, cache.index_select(1, beam_idx), cache))
    return k_cache, v_cache


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def seqlens_of(shape: dict) -> list[int]:
    """Per-row lengths: ``seqlens`` per group if given (every beam of a group has its length), else seeded
    lengths in [0, t_max] per group."""
    groups, beams = shape["groups"], shape["beams"]
    per_group = shape.get("seqlens")
    if per_group is None:
        rng = random.Random(99 + groups * 7 + shape["t_max"])
        per_group = [rng.randint(0, shape["t_max"]) for _ in range(groups)]
    return [n for n in per_group for _ in range(beams)]


def sources_of(shape: dict) -> list[int]:
    """Per-row source rows: ``sources`` (group-local) if given, else seeded draws within each group, some rows
    keeping their own beam."""
    groups, beams = shape["groups"], shape["beams"]
    local = shape.get("sources")
    if local is None:
        rng = random.Random(7 + 31 * groups + beams)
        local = [rng.randrange(beams) for _ in range(groups * beams)]
    return [g * beams + s for g in range(groups) for s in local[g * beams : (g + 1) * beams]]


def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``layers``, ``groups``, ``beams``, ``heads``, ``t_max``, ``head_dim``; optional ``seqlens``
    (per group) and ``sources`` (group-local source of every row)."""
    randn = seeded_randn(gen, device, dtype)
    dims = (shape["layers"], shape["groups"] * shape["beams"], shape["heads"], shape["t_max"], shape["head_dim"])
    return dict(
        k_cache=randn(*dims),
        v_cache=randn(*dims),
        cache_seqlens=torch.tensor(seqlens_of(shape), dtype=torch.int32, device=device),
        beam_idx=torch.tensor(sources_of(shape), dtype=torch.int64, device=device),
        num_beams=shape["beams"],
    )


def _shape(layers, groups, beams, heads, t_max, head_dim, **extra) -> dict:
    return dict(layers=layers, groups=groups, beams=beams, heads=heads, t_max=t_max, head_dim=head_dim, **extra)


TEST_SHAPES = (
    _shape(2, 2, 3, 2, 17, 32),  # odd T_max and beams
    _shape(1, 3, 4, 1, 40, 64, seqlens=(0, 40, 13), sources=(1, 0, 3, 2, 3, 3, 3, 3, 0, 1, 2, 3)),  # 0, full; swaps
    _shape(3, 1, 5, 3, 9, 48),  # head dim not a power of two
    _shape(1, 1, 1, 1, 1, 16),  # one beam: nothing moves
    _shape(2, 2, 2, 2, 70, 128, seqlens=(69, 70), sources=(1, 1, 1, 0)),  # a cycle within a group
)
GPU_SHAPES = (
    _shape(12, 8, 4, 12, 1024, 64),
    _shape(48, 2, 16, 25, 300, 64),
    _shape(24, 16, 2, 16, 2048, 64),
)


def shape_strategy(size: int):
    """Hypothesis: 1-3 layers, 1-3 groups of 1-6 beams, every head dim, lengths that include 0 and T_max."""
    from hypothesis import strategies as st

    @st.composite
    def shapes(draw):
        groups, beams = draw(st.integers(1, 3)), draw(st.integers(1, 6))
        t_max = draw(st.integers(1, 48 * size))
        seqlens = draw(st.lists(st.one_of(st.just(0), st.just(t_max), st.integers(0, t_max)),
                                min_size=groups, max_size=groups))  # fmt: skip
        sources = draw(st.lists(st.integers(0, beams - 1), min_size=groups * beams, max_size=groups * beams))
        d = draw(st.sampled_from([16, 32, 48, 64, 128]))
        layers, heads = draw(st.integers(1, 3)), draw(st.integers(1, 2 * size))
        return _shape(layers, groups, beams, heads, t_max, d, seqlens=tuple(seqlens), sources=tuple(sources))

    return shapes()


def invariants(shape: dict, inputs: Inputs, outputs: list[torch.Tensor]) -> None:
    """The op returns its caches themselves."""
    assert outputs[0] is inputs["k_cache"] and outputs[1] is inputs["v_cache"], "reorder_cache returns its caches"


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(*, l=2, b=4, h=2, t=8, d=32, beams=2, seqlens=(3, 3, 5, 5), src=(1, 0, 2, 2), device="cpu", **over) -> Inputs:
    kw = dict(k_cache=_rn(l, b, h, t, d, device=device), v_cache=_rn(l, b, h, t, d, device=device))
    kw["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32, device=device)
    kw["beam_idx"] = torch.tensor(src, dtype=torch.int64, device=device)
    kw["num_beams"] = beams
    kw.update(over)
    return kw


BAD_INPUTS = (
    BadInput("reorder-rank", "k_cache 4-D", lambda: _args(k_cache=_rn(4, 2, 8, 32), v_cache=_rn(4, 2, 8, 32)),
             ValueError, r"k_cache must be 5-D \[n_layer, B, H, T_max, D\], got shape \[4, 2, 8, 32\]"),
    BadInput("reorder-int", "k_cache int32", lambda: _args(k_cache=torch.zeros(2, 4, 2, 8, 32, dtype=torch.int32)),
             TypeError, r"k_cache must be float32, float16 or bfloat16, got torch\.int32"),
    BadInput("reorder-v-shape", "v_cache with another T_max", lambda: _args(v_cache=_rn(2, 4, 2, 9, 32)),
             ValueError, r"v_cache must have shape \[2, 4, 2, 8, 32\], got \[2, 4, 2, 9, 32\]"),
    BadInput("reorder-mixed-dtype", "v_cache fp16 with k_cache fp32",
             lambda: _args(v_cache=_rn(2, 4, 2, 8, 32, dtype=torch.float16)),
             TypeError, r"v_cache has dtype torch\.float16 but k_cache has torch\.float32; they must match"),
    BadInput("reorder-same", "k_cache and v_cache the same tensor",
             lambda: (lambda c: _args(k_cache=c, v_cache=c))(_rn(2, 4, 2, 8, 32)),
             ValueError, r"k_cache and v_cache are the same tensor"),
    BadInput("reorder-expanded", "an expand()-ed k_cache (would be written through aliases)",
             lambda: _args(k_cache=_rn(2, 4, 2, 1, 32).expand(2, 4, 2, 8, 32)),
             ValueError, r"k_cache has overlapping strides \(.*\) for shape \[2, 4, 2, 8, 32\]"),
    BadInput("reorder-empty", "a cache with 0 layers", lambda: _args(l=0),
             ValueError, r"k_cache is empty \(shape \[0, 4, 2, 8, 32\]\); every dimension must be >= 1"),
    BadInput("reorder-beams-int", "num_beams=2.0", lambda: _args(beams=2.0),
             ValueError, r"num_beams must be an int >= 1, got 2\.0"),
    BadInput("reorder-beams-divide", "batch 4 with num_beams=3", lambda: _args(beams=3),
             ValueError, r"the cache's batch 4 is not a multiple of num_beams=3"),
    BadInput("reorder-idx-int32", "beam_idx int32",
             lambda: _args(beam_idx=torch.tensor([1, 0, 2, 2], dtype=torch.int32)),
             TypeError, r"beam_idx must be torch\.int64, got torch\.int32"),
    BadInput("reorder-seqlens-int64", "cache_seqlens int64", lambda: _args(cache_seqlens=torch.tensor([3, 3, 5, 5])),
             TypeError, r"cache_seqlens must be torch\.int32, got torch\.int64"),
    BadInput("reorder-idx-list", "beam_idx a list", lambda: _args(beam_idx=[1, 0, 2, 2]),
             TypeError, r"beam_idx must be a torch\.int64 torch\.Tensor, got list"),
    BadInput("reorder-idx-len", "beam_idx of length 3 for B=4", lambda: _args(src=(0, 1, 2)),
             ValueError, r"beam_idx must have shape \[4\], got \[3\]"),
    BadInput("reorder-idx-device", "beam_idx on another device (meta)",
             lambda: _args(beam_idx=torch.zeros(4, dtype=torch.int64, device="meta")),
             RuntimeError, r"beam_idx is on meta but k_cache is on cpu"),
    BadInput("reorder-idx-other-group", "beam_idx pointing into another group", lambda: _args(src=(2, 0, 2, 2)),
             ValueError, r"beam_idx\[0\] = 2 is not a row of row 0's group of num_beams=2 rows"),
    BadInput("reorder-idx-negative", "beam_idx -1", lambda: _args(src=(0, 1, -1, 2)),
             ValueError, r"beam_idx\[2\] = -1 is not a row of row 2's group"),
    BadInput("reorder-seqlens-over", "cache_seqlens 9 > T_max 8", lambda: _args(seqlens=(3, 3, 9, 9)),
             ValueError, r"cache_seqlens must lie in \[0, T_max=8\], got 3\.\.9"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("reorder-cache-slice", "caches sliced along T_max (big[..., :8, :])",
              lambda d: _args(k_cache=_rn(2, 4, 2, 12, 32, device=d)[:, :, :, :8],
                              v_cache=_rn(2, 4, 2, 12, 32, device=d)[:, :, :, :8], device=d)),
    EdgeInput("reorder-head-dim-512", "head dim 512", lambda d: _args(d=512, device=d)),
    EdgeInput("reorder-64-beams", "one group of 64 beams",
              lambda d: _args(b=64, beams=64, seqlens=(5,) * 64, src=tuple(range(63, -1, -1)), device=d)),
    EdgeInput("reorder-layer-view", "the caches of one layer of a bigger cache (k[1:2])",
              lambda d: _args(k_cache=_rn(3, 4, 2, 8, 32, device=d)[1:2], v_cache=_rn(3, 4, 2, 8, 32, device=d)[1:2],
                              device=d)),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
def _bench(groups, beams, t_max, live, sweep, group, target=False) -> BenchCase:
    # every beam continues beam 0 or keeps its own row: the reorder is idempotent, so the timing loop's repeated
    # calls leave the result the checked one
    sources = [0 if j % 2 else j for j in range(beams)] * groups
    shape = dict(layers=12, groups=groups, beams=beams, heads=12, t_max=t_max, head_dim=64,
                 seqlens=[live] * groups, sources=sources)  # fmt: skip
    return BenchCase("reorder_cache", shape, sweep, group, target)


def bench_cases(sweep: str) -> list[BenchCase]:
    """GPT-2 small's cache (12 layers x 12 heads x 64) with beams 4 and 8, live prefixes of a 1024-position cache."""
    if sweep == "full":
        c = [_bench(8, 4, 1024, n, "live", "B=8x4 T_max=1024", n >= 512) for n in (16, 128, 512, 1024)]
        return c + [_bench(g, 8, 1024, 512, "groups", "beams=8 live=512") for g in (1, 4, 16)]
    if sweep == "quick":
        return [_bench(8, 4, 1024, n, "live", "B=8x4 T_max=1024", n >= 512) for n in (128, 512)]
    return [_bench(1, 2, 16, n, "live", "B=1x2 T_max=16") for n in (0, 5, 16)]


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Each row that changes beam reads and writes its live prefix of keys and values (rows keeping their beam
    move nothing); plus the lengths and indices."""
    s = torch.empty((), dtype=dtype).element_size()
    lens, src = seqlens_of(shape), sources_of(shape)
    moved = sum(n for r, (n, j) in enumerate(zip(lens, src)) if j != r)
    per_pos = shape["layers"] * shape["heads"] * shape["head_dim"] * s
    return Traffic(2 * 2 * moved * per_pos + 12 * len(lens), None, {"kv_bytes": 2 * 2 * moved * per_pos})


def baselines(device: torch.device) -> dict:
    """Plain PyTorch: ``index_select`` of whole rows (every ``T_max`` position, as transformers' static cache
    reorders), masked back to the live prefixes."""

    def whole_rows(inp: Inputs):
        return lambda: reference(*(inp[a] for a in ARGS))

    return {"torch": whole_rows}


register_op(OpSpec.from_module(__name__))
