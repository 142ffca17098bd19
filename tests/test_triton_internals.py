"""Internals of the Triton backend: what tests/test_ops_conformance.py (every op on every backend) cannot see.

Split counts and the single-slice decode path, launch arguments and autotune keys that must not change between
decode steps, lengths clamped when nobody checked them, the torch.library registration (torch.compile, opcheck),
the ``supports`` reasons, the per-GPU-generation config pruning behind benchmarks/compile_check.py, and the
availability reasons.  Without CUDA, conftest sets TRITON_INTERPRET=1 and the kernels run in Triton's interpreter
on CPU; the ``gpu`` tests run only on a GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import triton
from _backends import DEVICE

from gpt2fast import ops
from gpt2fast.ops import _registry
from gpt2fast.ops._registry import get_impl
from gpt2fast.ops.triton import _tuning
from gpt2fast.ops.triton._common import TL_DTYPE
from gpt2fast.testing import assert_fa_close
from gpt2fast.testing import conformance as cf

STATUS = ops.backend_status("triton", DEVICE)
pytestmark = [
    pytest.mark.skipif(not STATUS.available, reason=f"triton backend unavailable: {STATUS.reason}"),
    # The kernels' tanh is 2/(1 + exp(-2x)) - 1: exp overflowing to inf for large |x| is intended (it saturates
    # to ±1), but Triton's interpreter computes it with numpy, which warns.
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

DEV = torch.device(DEVICE)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DECODE = ops.get_spec("decode_attention")
attention_mod = importlib.import_module("gpt2fast.ops.triton.attention")
decode_mod = importlib.import_module("gpt2fast.ops.triton.decode_attention")
ROOT = Path(__file__).resolve().parents[1]


def decode_case(b, h, t_max, d, seqlens, dtype=torch.float32, append=True, **extra) -> tuple[dict, dict]:
    """``(inputs, shape)`` of a decode step, from the spec's own input maker."""
    shape = dict(batch=b, heads=h, t_max=t_max, head_dim=d, seqlens=tuple(seqlens), append=append, **extra)
    return DECODE.make_inputs(shape, dtype, DEV, torch.Generator().manual_seed(cf.SEED)), shape


def triton_fn(op: str):
    """The triton backend's registered implementation of ``op`` (the op's own arguments, no validation)."""
    return get_impl(op, "triton").fn


def recorded_launches(monkeypatch, run_kernels: bool = True) -> list[tuple]:
    """Replace the decode module's ``launch`` with one that records ``(kernel, tuned, grid, args, consts,
    config)`` (and still launches when ``run_kernels``); returns the list it appends to."""
    launches: list[tuple] = []
    real_launch = decode_mod.launch

    def record(kernel, tuned, grid, args, consts, config):
        launches.append((kernel, tuned, grid, args, consts, config))
        if run_kernels:
            real_launch(kernel, tuned, grid, args, consts, config)

    monkeypatch.setattr(decode_mod, "launch", record)
    return launches


# ---- decode: split counts and the single-slice path ----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_decode_split_counts(dtype, num_splits, monkeypatch):
    # 1 = the single-slice path (the split kernel writes the output, no combine launch); 7 slices of 8 positions
    # over a 50-slot cache: the last slice covers 48..55, mostly past T_max.
    monkeypatch.setattr(decode_mod, "run", functools.partial(decode_mod.run, num_splits=num_splits))
    launches = recorded_launches(monkeypatch)
    inputs, shape = decode_case(3, 2, 50, 32, [49, 0, 23], dtype)
    cf.check_parity(DECODE, "triton", inputs, shape=shape, msg=f"num_splits={num_splits}")
    want = [("_decode_split_kernel", (6, num_splits))] + ([("_decode_combine_kernel", (6,))] if num_splits > 1 else [])
    assert [(kernel.fn.__name__, grid) for kernel, _, grid, *_ in launches] == want


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("same_new_strides", [True, False])
def test_decode_qkv_projection_views(same_new_strides, num_splits, monkeypatch):
    # q, k_new, v_new as the model passes them: [B, H, D] views of one [B, 3, H, D] projection (read in place), or
    # a v_new with other strides than k_new (both copied: the kernel reads them through one stride pair).
    monkeypatch.setattr(decode_mod, "run", functools.partial(decode_mod.run, num_splits=num_splits))
    inputs, shape = decode_case(3, 2, 20, 64, [0, 7, 19])
    qkv = torch.stack([inputs["q"], inputs["k_new"], inputs["v_new"]], dim=1)  # [B, 3, H, D]
    q, kn, vn = qkv.unbind(1)
    inputs.update(q=q, k_new=kn, v_new=vn if same_new_strides else vn.contiguous())
    cf.check_parity(DECODE, "triton", inputs, shape=shape, msg=f"same_new_strides={same_new_strides}")


# ---- decode: lengths nobody checked are clamped --------------------------------------------------------------
SENTINEL = 12345.0


@pytest.mark.parametrize("append", [True, False])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_clamps_unchecked_lengths(append, num_splits, monkeypatch):
    # With check_seqlens=False (as under graph capture) the lengths reach the kernel unchecked.  They are clamped
    # to [0, T_max] as in the CUDA kernel: -1 must not make slice 0 (-1 // SPLIT_LEN truncates to 0) append at
    # position -1, i.e. into the memory before the cache; >= T_max attends to the whole cache and appends nothing.
    # The caches are slices of bigger sentinel-filled buffers, so a write outside them shows.
    monkeypatch.setattr(decode_mod, "run", functools.partial(decode_mod.run, num_splits=num_splits))
    b, h, t_max, d, pad = 6, 2, 20, 32, 4
    seqlens = [-1, -17, 0, 7, t_max, t_max + 9]
    g = torch.Generator().manual_seed(cf.SEED)
    q = torch.randn(b, h, d, generator=g, device="cpu").to(DEV)
    bufs = []
    for _ in range(2):
        big = torch.full((b, h, pad + t_max + pad, d), SENTINEL)
        big[:, :, pad : pad + t_max] = torch.randn(b, h, t_max, d, generator=g)
        bufs.append(big.to(DEV))
    kn, vn = (torch.randn(b, h, d, generator=g).to(DEV) for _ in range(2)) if append else (None, None)
    expected = [big.clone() for big in bufs]
    lengths = torch.tensor(seqlens, dtype=torch.int32, device=DEV)

    def cache(big: torch.Tensor) -> torch.Tensor:
        return big[:, :, pad : pad + t_max]

    out = ops.decode_attention(q, *map(cache, bufs), lengths, kn, vn, backend="triton", check_seqlens=False)
    assert lengths.tolist() == seqlens, "cache_seqlens must not be modified"
    refs = []
    for i, s in enumerate(seqlens):  # the reference on the clamped length, writing into the expected buffers
        n, one = min(max(s, 0), t_max), slice(i, i + 1)
        new = (kn[one], vn[one]) if append and n < t_max else (None, None)
        n_t = torch.tensor([n], dtype=torch.int32, device=DEV)
        refs.append(DECODE.reference(q[one], *(cache(e)[one] for e in expected), n_t, *new))
    for got, want, name in zip(bufs, expected, ("k_cache", "v_cache"), strict=True):
        wrong = (got != want).nonzero().tolist()
        assert not wrong, f"{name} buffer: {len(wrong)} elements differ from the clamped semantics, first {wrong[:2]}"
    for i, ref in enumerate(refs):
        assert_fa_close(out[i : i + 1], ref, msg=f"sequence {i} with cache_seqlens={seqlens[i]}")


# ---- decode: one binary and one autotune key for every step --------------------------------------------------
def test_decode_launch_arguments_do_not_change_between_steps(monkeypatch):
    # One compiled kernel (and one autotune key) for every decode step, and CUDA-graph replayable: the grid and
    # every non-tensor argument (ints are JIT-specialised, constexprs and autotune keys select the binary) must
    # not depend on the lengths, which the kernel reads from device memory.
    launches = recorded_launches(monkeypatch)
    inputs, _ = decode_case(2, 2, 40, 32, [0, 3], torch.float16)
    steps = []
    for lengths in ([0, 3], [1, 4], [17, 38]):
        launches.clear()
        inputs["cache_seqlens"].copy_(torch.tensor(lengths, dtype=torch.int32))
        DECODE.call(inputs, "triton")
        steps.append(
            [
                (
                    kernel.fn.__name__,
                    grid,
                    tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args),
                    consts,
                    str(cfg),
                )
                for kernel, _, grid, args, consts, cfg in launches
            ]
        )
    assert [step[0] for step in steps[0]] == ["_decode_split_kernel", "_decode_combine_kernel"]
    assert steps[0] == steps[1] == steps[2]


def split_autotune_key(launches: list[tuple], bh: tuple[int, int], t_max: int) -> tuple:
    """The values of the decode split kernel's autotune key for a step on a [B, H, T_max, 64] fp16 cache, read
    from the arguments its launch gets (``launches`` from :func:`recorded_launches` without running: meta
    tensors)."""
    launches.clear()
    b, h = bh
    q = torch.empty(b, h, 64, dtype=torch.float16, device="meta")
    kc = torch.empty(b, h, t_max, 64, dtype=torch.float16, device="meta")
    lengths = torch.empty(b, dtype=torch.int32, device="meta")
    decode_mod.run(q, kc, kc, lengths, q, q, 0.125)
    kernel, tuned, _grid, args, consts, _cfg = launches[0]
    assert kernel is decode_mod._decode_split_kernel and tuned is decode_mod._decode_split_tuned
    named = {**dict(zip(kernel.arg_names, args)), **consts}  # the runtime args come first, then constexprs
    return tuple(named[k] for k in tuned.keys)


@pytest.mark.parametrize("bh", [(1, 12), (32, 12)], ids=["B=1", "B=32"])
def test_decode_autotune_key_changes_once_per_doubling(bh, monkeypatch):
    # patch_hf's cache grows by one position per step.  The slice length changes every 128 positions at B=32
    # (one slice per sequence): keyed on it, generation would stall for a re-autotune every 128 tokens.  Keyed on
    # its power-of-two bucket, the key (hence the tuning) changes at most once per doubling of T_max.
    monkeypatch.setattr(decode_mod, "interpreting", lambda: False)  # the GPU's split plan (128-position granule)
    launches = recorded_launches(monkeypatch, run_kernels=False)
    keys = {t: split_autotune_key(launches, bh, t) for t in range(1, 8193, 7)}
    for t, key in keys.items():
        splits, split_len = decode_mod.split_plan(bh[0] * bh[1], t, torch.device("meta"))
        assert key == (_tuning.split_bucket(split_len), 64, True, splits == 1), f"T_max={t}"
    changes = sum(a != b for a, b in zip(list(keys.values()), list(keys.values())[1:]))
    assert changes <= math.log2(8192 / 128) + 1, f"{changes} re-tunes while T_max grows to 8192"
    if bh == (32, 12):  # one slice of ceil(T_max / 128) * 128 positions
        same = [split_autotune_key(launches, bh, t) for t in (257, 300, 400, 512)]  # slices of 384 or 512
        assert same[0] == same[1] == same[2] == same[3]
        assert split_autotune_key(launches, bh, 513) != same[0]  # 640: the next bucket


# ---- layer_norm: statistics of the shifted row ---------------------------------------------------------------
@pytest.mark.parametrize("n", [768, 1600])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_huge_mean_tiny_spread_vs_fp64(n, residual):
    # Rows of 1e4 + N(0, 1e-2) in fp32: unshifted fp32 statistics are off by ~0.15 after normalising (as is torch's
    # fp32 CPU LayerNorm, so the baseline is the fp64 result rounded to fp32, a stricter bound than test_stress's).
    g = torch.Generator().manual_seed(cf.SEED)
    h = (1e4 + 1e-2 * torch.randn(3, n, generator=g, dtype=torch.float64)).float()
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    r = (1e-2 * torch.randn(3, n, generator=g)) if residual else None
    x = h if r is None else h - r  # x + r rounds back to (about) h
    x, w, b, r = (None if t is None else t.to(DEV) for t in (x, w, b, r))
    out = triton_fn("layer_norm")(x, w, b, 1e-5, r)
    y, h = out if residual else (out, x)
    ref64 = torch.nn.functional.layer_norm(h.double(), (n,), w.double(), b.double(), 1e-5)
    assert_fa_close(y, ref64, msg=f"layer_norm 1e4+N(0,1e-2) n={n} residual={residual}")


# ---- torch.library registration ------------------------------------------------------------------------------
def test_ops_trace_under_torch_compile():
    # aot_eager exercises the fake (meta) implementations and the declared cache mutation.  The backend functions
    # are called directly: the generic dispatcher's own traceability is not this file's subject.
    layer_norm, bias_gelu = triton_fn("layer_norm"), triton_fn("bias_gelu")
    attention, decode_attention = triton_fn("attention"), triton_fn("decode_attention")

    def step(x, w, bias, q, kc, vc, sl, kn, vn):
        y, h = layer_norm(x, w, bias, 1e-5, x)
        g = bias_gelu(layer_norm(y, w, bias, 1e-5, None), bias)
        a = attention(kc[:, :, :4], kc[:, :, :4], vc[:, :, :4], True, None)
        o = decode_attention(q, kc, vc, sl, kn, vn, None)
        return g + h, a, o

    x, w, bias = (torch.randn(*s, device=DEV) for s in ((2, 64), (64,), (64,)))
    inputs, _ = decode_case(2, 2, 8, 32, [2, 5])
    dec = [inputs[a] for a in DECODE.args[:-1]]
    eager_caches = [t.clone() for t in dec[1:3]]
    eager = step(x, w, bias, dec[0], *eager_caches, *dec[3:])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x, w, bias, *dec)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)
    assert torch.equal(dec[1], eager_caches[0]) and torch.equal(dec[2], eager_caches[1]), "the append must survive"


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm", "bias_gelu", "attention", "decode_attention"])
def test_opcheck(name):
    # torch.library.opcheck: schema (incl. mutates_args), fake tensor and autograd registration checks.
    x, w, b = (torch.randn(*s, device=DEV) for s in ((2, 64), (64,), (64,)))
    inputs, _ = decode_case(2, 2, 8, 32, [2, 7])
    q, kc, vc, sl, kn, vn = (inputs[a] for a in DECODE.args[:-1])
    args = {
        "layer_norm": (x, w, b, 1e-5),
        "add_layer_norm": (x, w, b, 1e-5, x.clone()),
        "bias_gelu": (x, b),
        "attention": (kc, kc.clone(), vc, True, 0.25),
        "decode_attention": (q, kc, vc, sl, kn, vn, 0.25),
    }[name]
    torch.library.opcheck(getattr(torch.ops.gpt2fast_triton, name).default, args)


def test_every_custom_op_is_opchecked():
    """The list above is every op of the gpt2fast_triton namespace."""
    namespace = {
        n
        for n in dir(torch.ops.gpt2fast_triton)
        if isinstance(getattr(torch.ops.gpt2fast_triton, n), torch._ops.OpOverloadPacket)
    }
    assert namespace == {"layer_norm", "add_layer_norm", "bias_gelu", "attention", "decode_attention", "reorder_cache"}
    # (reorder_cache's opcheck is in tests/test_reorder_cache.py)


# ---- supports: what the kernels cannot take, decided on metadata (meta tensors carry strides, no memory) ------
def meta(*shape: int, stride: tuple[int, ...] | None = None) -> torch.Tensor:
    """A meta tensor of ``shape`` (contiguous, or with ``stride``)."""
    if stride is None:
        return torch.empty(*shape, device="meta")
    return torch.empty_strided(shape, stride, device="meta")


HUGE = (2**40, 2**36, 2**26, 1)  # one (batch, head) slice spans 63 * 2**26 + 63 elements: beyond int32
HUGE_REASON = (
    "{name} has strides (1099511627776, 68719476736, 67108864, 1) for shape (1, 2, 64, 64): offsets within one "
    "(batch, head) slice reach 4227858495 elements, but the triton kernels index a slice with int32 (< 2**31); "
    "pass a contiguous tensor"
)


def test_supports_attention_reasons():
    ok = meta(1, 2, 64, 64)
    assert ops.supported("attention", "triton", ok, ok, ok, True, None) is None
    huge = meta(1, 2, 64, 64, stride=HUGE)
    assert ops.supported("attention", "triton", ok, ok, huge, True, None) == HUGE_REASON.format(name="v")
    assert ops.supported("attention", "triton", huge, ok, ok, True, None) == HUGE_REASON.format(name="q")
    d48 = meta(1, 1, 8, 48)
    assert ops.supported("attention", "triton", d48, d48, d48, True, None) == (
        "triton attention supports head dims (32, 64, 128); got q with D=48"
    )


@pytest.mark.parametrize("bh", [(65536, 1), (1, 65536)])
def test_supports_attention_grid_limit(bh):
    # B and H each get a CUDA grid dim limited to 65535 (B*H beyond it is fine: see the spec's GPU shapes).
    edge = meta(65535, 65535, 1, 32)
    assert ops.supported("attention", "triton", edge, edge, edge, True, None) is None
    q = meta(*bh, 1, 32)
    assert ops.supported("attention", "triton", q, q, q, True, None) == (
        f"triton attention launches B and H on CUDA grid dims limited to 65535; got q with B={bh[0]}, H={bh[1]}"
    )


def test_supports_decode_reasons():
    q, ok, huge, lengths = meta(1, 2, 64), meta(1, 2, 64, 64), meta(1, 2, 64, 64, stride=HUGE), meta(1)
    assert ops.supported("decode_attention", "triton", q, ok, ok, lengths, q, q, None) is None
    assert ops.supported("decode_attention", "triton", q, huge, ok, lengths, q, q, None) == HUGE_REASON.format(
        name="k_cache"
    )
    assert ops.supported("decode_attention", "triton", q, ok, huge, lengths, None, None, None) == HUGE_REASON.format(
        name="v_cache"
    )
    q16, c16 = meta(1, 2, 16), meta(1, 2, 8, 16)
    assert ops.supported("decode_attention", "triton", q16, c16, c16, lengths, q16, q16, None) == (
        "triton decode_attention supports head dims (32, 64, 128); got q with D=16"
    )


def test_supports_row_widths():
    x, w = meta(1, 16384), meta(16384)
    assert ops.supported("layer_norm", "triton", x, w, w, 1e-5, None) is None
    x, w = meta(1, 16385), meta(16385)
    assert ops.supported("layer_norm", "triton", x, w, w, 1e-5, x) == (
        "triton layer_norm keeps a row in registers: N must be <= 16384, got 16385"
    )
    x, w = meta(1, 100_000), meta(100_000)
    assert ops.supported("bias_gelu", "triton", x, w) is None  # a 2-D grid of column blocks: any width


# ---- launch-config policy: pruning per GPU generation, and what compile_check compiles (no kernel runs) -------
@pytest.fixture
def gpu_capability(monkeypatch):
    """Pretend the CUDA device has a given compute capability: call with (major, minor)."""

    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        _tuning.tuning_arch.cache_clear()

    yield set_capability
    _tuning.tuning_arch.cache_clear()


def pruned(table: _tuning.TileTable, cap, set_capability, dtype, head_dim):
    """The tiles ``table``'s autotune prune hook keeps for a launch on a GPU of capability ``cap``."""
    set_capability(cap)
    q = types.SimpleNamespace(dtype=dtype, device=torch.device("cuda", 0))  # only dtype and device are read
    return [table.tile(c) for c in table.prune(table.configs, {"Q": q}, HEAD_DIM=head_dim)]


@pytest.mark.parametrize("table", [_tuning.ATTENTION, _tuning.DECODE_SPLIT], ids=["attention", "decode"])
@pytest.mark.parametrize("cap,arch", [((8, 0), 80), ((8, 6), 80), ((9, 0), 90), ((10, 0), 90)])
def test_autotune_prune_follows_the_gpu_generation(table, cap, arch, gpu_capability):
    # The prune hook reads the launch device's capability and keeps that target's spill-free tiles (never none).
    for dtype in DTYPES:
        for d in (32, 64, 128):
            kept = pruned(table, cap, gpu_capability, dtype, d)
            assert kept, f"nothing left for {dtype} D={d} on {cap}"
            assert kept == table.tiles(dtype, d, arch)


def test_kernels_autotune_over_the_tables():
    # The autotuners use the tables' configs and prune hooks (nothing of their own).
    for tuned, configs in (
        (attention_mod._attention_tuned, _tuning.ATTENTION.configs),
        (decode_mod._decode_split_tuned, _tuning.DECODE_SPLIT.configs),
        (importlib.import_module("gpt2fast.ops.triton.layer_norm")._layer_norm_tuned, _tuning.LAYER_NORM_CONFIGS),
        (importlib.import_module("gpt2fast.ops.triton.bias_gelu")._bias_gelu_tuned, _tuning.BIAS_GELU_CONFIGS),
    ):
        assert [str(c) for c in tuned.configs] == [str(c) for c in configs]
    assert attention_mod._attention_tuned.early_config_prune == _tuning.ATTENTION.prune
    assert decode_mod._decode_split_tuned.early_config_prune == _tuning.DECODE_SPLIT.prune


def test_prune_drops_sm80_spills_and_keeps_sm90_gpt2_tiles(gpu_capability):
    # Measured by benchmarks/compile_check.py --full (triton 3.9): these spill registers on sm_80 ...
    sm80_spills = {
        32: {(128, 32, 4, 3)},
        64: {(128, 64, 4, 3)},
        128: {(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)},
    }
    attention, decode = _tuning.ATTENTION, _tuning.DECODE_SPLIT
    for dtype in (torch.float16, torch.bfloat16):
        for d, bad in sm80_spills.items():
            assert not bad & set(pruned(attention, (8, 0), gpu_capability, dtype, d))
        # ... while on sm_90 nothing spills for GPT-2's head dim, so every fp16/bf16 tile stays.
        assert pruned(attention, (9, 0), gpu_capability, dtype, 64) == list(_tuning.ATTENTION_HALF_TILES)
    assert (64, 2, 3) not in pruned(decode, (8, 0), gpu_capability, torch.float16, 128)
    assert (128, 4, 2) not in pruned(decode, (9, 0), gpu_capability, torch.float32, 128)
    assert (64, 2, 3) not in pruned(decode, (9, 0), gpu_capability, torch.bfloat16, 128)  # since the clamp
    assert pruned(decode, (9, 0), gpu_capability, torch.float16, 64) == list(_tuning.DECODE_TILES)


def got_tile(case) -> tuple[int, ...]:
    """(BLOCK_M?, BLOCK_N, warps, stages) of a compile case, like :meth:`TileTable.tile`."""
    blocks = tuple(case.constexprs[k] for k in ("BLOCK_M", "BLOCK_N") if k in case.constexprs)
    return (*blocks, case.num_warps, case.num_stages)


@pytest.mark.parametrize("arch", _tuning.SPILL_CHECKED_ARCHS)
def test_compile_cases_mirror_what_a_gpu_can_launch(arch, monkeypatch):
    # benchmarks/compile_check.py compiles compile_cases(full=True, arch) for each target: exactly the pruned
    # autotune tiles plus the heuristic config of each dtype x head dim (as on a GPU, not the interpreter's).
    monkeypatch.setattr(_tuning, "interpreting", lambda: False)
    tables = (
        (attention_mod, "attention", _tuning.ATTENTION, lambda d, dtype: _tuning.attention_heuristic(d, dtype, arch)),
        (decode_mod, "decode_split", _tuning.DECODE_SPLIT, lambda d, dtype: _tuning.decode_split_heuristic(d)),
    )
    for mod, kernel, table, heuristic in tables:
        cases = [c for c in mod.compile_cases(True, arch) if c.kernel == kernel]
        for dtype, tname in TL_DTYPE.items():
            for d in (32, 64, 128):
                heur = table.tile(heuristic(d, dtype))
                want = set(table.tiles(dtype, d, arch)) | {heur}
                mine = [c for c in cases if c.label.startswith(f"{tname} D={d} ")]
                assert {got_tile(c) for c in mine} == want, f"{kernel} {tname} D={d} sm_{arch}"
                assert all(c.heuristic == (got_tile(c) == heur) for c in mine)


def load_compile_check(monkeypatch) -> types.ModuleType:
    """benchmarks/compile_check.py as a module (it edits the environment and sys.path on import: undone after)."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "benchmarks" / "compile_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compile_check_finds_the_kernels_through_the_registry(monkeypatch):
    cc = load_compile_check(monkeypatch)
    names = [m.__name__ for m in cc.kernel_modules()]
    triton_ops = [r.op for r in ops.implementations() if r.backend == "triton"]
    assert names == [f"gpt2fast.ops.triton.{op}" for op in triton_ops]
    kernels = {c.kernel for c in cc.cases(False, 90)}
    assert kernels == {"attention", "bias_gelu", "decode_split", "decode_combine", "layer_norm", "reorder_cache"}
    monkeypatch.delitem(_registry._impls, ("bias_gelu", "triton"))  # an op the backend no longer implements ...
    assert "gpt2fast.ops.triton.bias_gelu" not in [m.__name__ for m in cc.kernel_modules()]  # ... is not compiled


# ---- availability --------------------------------------------------------------------------------------------
def test_is_available_here():
    from gpt2fast.ops import triton as tb

    assert tb.is_available(DEV) is None
    assert "triton" in STATUS.reason
    if DEVICE == "cpu":
        assert "interpreter" in STATUS.reason and "TRITON_INTERPRET=1" in STATUS.reason


def test_is_available_reasons(monkeypatch):
    from gpt2fast.ops import triton as tb

    version = f"triton {triton.__version__}"
    assert tb.is_available(torch.device("meta")) == f"{version}: no Triton target for meta tensors"
    monkeypatch.setattr(tb, "interpreting", lambda: True)
    assert tb.is_available(torch.device("cuda", 0)) == (
        f"{version}: TRITON_INTERPRET=1 is set, so the kernels run interpreted (CPU tensors only)"
    )
    monkeypatch.setattr(tb, "interpreting", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tb.is_available(torch.device("cpu")) == (
        f"{version} kernels run on CUDA tensors; for CPU tensors TRITON_INTERPRET=1 was set only after "
        "triton/gpt2fast were imported; set it before"
    )
    monkeypatch.delenv("TRITON_INTERPRET")
    assert tb.is_available(torch.device("cpu")) == (
        f"{version} kernels run on CUDA tensors; for CPU tensors set TRITON_INTERPRET=1 before importing gpt2fast "
        "to run them interpreted (slow, for tests)"
    )


# ---- GPU only ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("autotune", ["1", "0"])
def test_gpu_decode_cuda_graph_replay(autotune, monkeypatch):
    # Autotuning (when on) must finish in the warm-up: a capture that tuned would synchronise and fail.
    monkeypatch.setenv("GPT2FAST_AUTOTUNE", autotune)
    static, _ = decode_case(2, 12, 256, 64, [10, 200], torch.float16)
    DECODE.call(static, "triton")  # warm up (autotune, compile) outside the graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = DECODE.call(static, "triton")
    for lengths in ([11, 201], [0, 255]):  # nothing about the lengths is baked into the graph
        static["cache_seqlens"].copy_(torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
        g.replay()
        torch.cuda.synchronize()
        ref_inputs = dict(static, k_cache=static["k_cache"].clone(), v_cache=static["v_cache"].clone())
        assert_fa_close(out, DECODE.run_reference(ref_inputs)[0], msg=f"replay with cache_seqlens={lengths}")


#: GPT-2 small's shapes, per op the backend implements.
GPT2_SMALL = {
    "layer_norm": dict(rows=512, n=768, residual=True),
    "bias_gelu": dict(rows=512, n=3072),
    "attention": dict(batch=2, heads=12, seq=300, head_dim=64),
    "decode_attention": dict(batch=4, heads=12, t_max=1024, head_dim=64, seqlens=(0, 1, 700, 1023), append=True),
    "reorder_cache": dict(layers=12, groups=4, beams=4, heads=12, t_max=1024, head_dim=64, seqlens=(1, 30, 700, 1024)),
}


def test_gpt2_small_shapes_cover_every_triton_op():
    assert set(GPT2_SMALL) == {r.op for r in ops.implementations() if r.backend == "triton"}


@pytest.mark.gpu
@pytest.mark.parametrize("op", list(GPT2_SMALL))
def test_gpu_autotuned_ops_at_gpt2_small_shapes(op, monkeypatch):
    # The autotuned path (whatever config wins) at GPT-2 small's shapes, even when the run disables autotuning.
    monkeypatch.setenv("GPT2FAST_AUTOTUNE", "1")
    spec, shape = ops.get_spec(op), GPT2_SMALL[op]
    inputs = spec.make_inputs(shape, torch.float16, DEV, torch.Generator().manual_seed(cf.SEED))
    cf.check_parity(spec, "triton", inputs, shape=shape, msg="autotuned")
