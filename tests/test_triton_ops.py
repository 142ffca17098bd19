"""Parity of the Triton backend with the reference backend (FlashAttention tolerance rule).

On a machine without CUDA, conftest sets TRITON_INTERPRET=1 and everything runs in Triton's
interpreter on CPU with tiny shapes; the ``gpu`` tests (larger shapes) run only on a GPU.
"""

from __future__ import annotations

import importlib
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fast import ops
from gpt2fast.ops import reference
from gpt2fast.testing import assert_fa_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STATUS = ops.backend_status("triton", DEVICE)
pytestmark = pytest.mark.skipif(not STATUS.available, reason=f"triton backend unavailable: {STATUS.reason}")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
decode_mod = importlib.import_module("gpt2fast.ops.triton.decode_attention")


def rand(*shape, dtype=torch.float32, scale=1.0):
    """Random normal tensor on the test device."""
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


def up(t):
    """fp32 copy (for the fp32 reference), None stays None."""
    return None if t is None else t.float()


def check(out, ref32, base, msg=""):
    """FA rule on a tensor or on matching tuples of tensors."""
    if isinstance(out, tuple):
        for o, r, b in zip(out, ref32, base, strict=True):
            assert_fa_close(o, r, b, msg=msg)
    else:
        assert_fa_close(out, ref32, base, msg=msg)


# ---- availability --------------------------------------------------------------------------


def test_is_available_reason_is_informative():
    from gpt2fast.ops import triton as tb

    ok, reason = tb.is_available(torch.device(DEVICE))
    assert ok and "triton" in reason
    if DEVICE == "cpu":
        assert "TRITON_INTERPRET" in reason
    ok, reason = tb.is_available(torch.device("meta"))
    assert not ok and "meta" in reason


# ---- layer_norm ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 768), (2, 3, 1600), (5, 1280), (3, 100)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm(dtype, shape, residual):
    n = shape[-1]
    x, w, b = rand(*shape, dtype=dtype), rand(n, dtype=dtype), rand(n, dtype=dtype)
    r = rand(*shape, dtype=dtype, scale=2.0) if residual else None
    out = ops.layer_norm(x, w, b, 1e-5, residual=r, backend="triton")
    ref32 = reference.layer_norm(up(x), up(w), up(b), 1e-5, up(r))
    base = reference.layer_norm(x, w, b, 1e-5, r)
    check(out, ref32, base, f"layer_norm {shape}")


@pytest.mark.parametrize("n", [768, 1600])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_huge_mean_tiny_spread_vs_fp64(n, residual):
    # Rows of 1e4 + N(0, 1e-2) in fp32: unshifted fp32 statistics are off by ~0.15 after normalising (as is
    # torch's fp32 CPU LayerNorm, so the baseline is the fp64 result rounded to fp32, not torch's fp32 run).
    g = torch.Generator().manual_seed(0)
    h = (1e4 + 1e-2 * torch.randn(3, n, generator=g, dtype=torch.float64)).float()
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
    r = (1e-2 * torch.randn(3, n, generator=g)) if residual else None
    x = h if r is None else h - r  # x + r rounds back to (about) h
    x, w, b, r = (None if t is None else t.to(DEVICE) for t in (x, w, b, r))
    out = ops.layer_norm(x, w, b, 1e-5, residual=r, backend="triton")
    y, h = out if residual else (out, x)
    ref64 = torch.nn.functional.layer_norm(h.double(), (n,), w.double(), b.double(), 1e-5)
    assert_fa_close(y, ref64, msg=f"layer_norm 1e4+N(0,1e-2) n={n} residual={residual}")


def test_layer_norm_noncontiguous_input():
    x = rand(6, 4, 768).transpose(0, 1)
    w, b = rand(768), rand(768)
    out = ops.layer_norm(x, w, b, backend="triton")
    assert_fa_close(out, reference.layer_norm(x, w, b))


# ---- bias_gelu -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3072), (2, 3, 1600), (7, 100)])
def test_bias_gelu(dtype, shape):
    x, b = rand(*shape, dtype=dtype, scale=3.0), rand(shape[-1], dtype=dtype)
    out = ops.bias_gelu(x, b, backend="triton")
    check(out, reference.bias_gelu(up(x), up(b)), reference.bias_gelu(x, b), f"bias_gelu {shape}")


def test_bias_gelu_saturates_without_nan():
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4]], device=DEVICE)
    out = ops.bias_gelu(x, torch.zeros(7, device=DEVICE), backend="triton")
    assert_fa_close(out, reference.bias_gelu(x, torch.zeros(7, device=DEVICE)))


# ---- attention -----------------------------------------------------------------------------


def attention_parity(q, k, v, causal, scale=None):
    out = ops.attention(q, k, v, causal=causal, scale=scale, backend="triton")
    ref32 = reference.attention(up(q), up(k), up(v), causal, scale)
    base = reference.attention(q, k, v, causal, scale)
    check(out, ref32, base, f"attention {tuple(q.shape)} causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 1, 64), (1, 2, 70, 64), (2, 1, 33, 32), (1, 1, 40, 128)])
def test_attention(dtype, causal, shape):
    attention_parity(*(rand(*shape, dtype=dtype) for _ in range(3)), causal)


def test_attention_strided_views_and_scale():
    # [B, T, H, D] views transposed to [B, H, T, D], as a QKV projection produces them: no copies needed.
    q, k, v = (rand(2, 37, 3, 64).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    attention_parity(q, k, v, True, scale=0.3)


@settings(max_examples=6, deadline=None)
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2),
    t=st.integers(1, 100),
    d=st.sampled_from([32, 64]),
    causal=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_attention_hypothesis(b, h, t, d, causal, dtype):
    attention_parity(*(rand(b, h, t, d, dtype=dtype) for _ in range(3)), causal)


# ---- decode_attention ----------------------------------------------------------------------


def decode_case(b, h, t_max, d, seqlens, dtype, append):
    """Random decode inputs; returns (q, k_cache, v_cache, seqlens, k_new, v_new)."""
    q = rand(b, h, d, dtype=dtype)
    kc, vc = rand(b, h, t_max, d, dtype=dtype), rand(b, h, t_max, d, dtype=dtype)
    kn = rand(b, h, d, dtype=dtype) if append else None
    vn = rand(b, h, d, dtype=dtype) if append else None
    return q, kc, vc, torch.tensor(seqlens, dtype=torch.int32, device=DEVICE), kn, vn


def decode_parity(q, kc, vc, sl, kn, vn, num_splits=None, scale=None):
    """Run triton and reference on copies of the caches; check output, cache writes and seqlens."""
    kc_t, vc_t, sl_t = kc.clone(), vc.clone(), sl.clone()
    if num_splits is None:
        out = ops.decode_attention(q, kc_t, vc_t, sl_t, kn, vn, scale=scale, backend="triton")
    else:
        s = q.shape[-1] ** -0.5 if scale is None else scale
        out = decode_mod.run(q, kc_t, vc_t, sl_t, kn, vn, s, num_splits=num_splits)
    kc_r, vc_r = kc.clone(), vc.clone()
    base = reference.decode_attention(q, kc_r, vc_r, sl, kn, vn, scale)
    ref32 = reference.decode_attention(up(q), up(kc), up(vc), sl, up(kn), up(vn), scale)
    check(out, ref32, base, f"decode seqlens={sl.tolist()} splits={num_splits}")
    assert torch.equal(sl_t, sl), "cache_seqlens must not be modified"
    assert torch.equal(kc_t, kc_r) and torch.equal(vc_t, vc_r), "caches differ from the reference after append"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("append", [True, False])
def test_decode_ragged_lengths(dtype, append):
    # Very different lengths in one batch, including an empty sequence and one that fills the cache.
    t_max = 40
    full = t_max - 1 if append else t_max
    case = decode_case(4, 2, t_max, 64, [0, 1, 17, full], dtype, append)
    out = decode_parity(*case)
    if not append:
        assert torch.equal(out[0], torch.zeros_like(out[0])), "an empty sequence must give zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_decode_split_counts(dtype, num_splits):
    # 1 = the single-slice path writing the output directly; 7 slices of a 50-slot cache leave one empty.
    decode_parity(*decode_case(3, 2, 50, 32, [49, 0, 23], dtype, True), num_splits=num_splits)


def test_decode_append_writes_only_the_slot():
    q, kc, vc, sl, kn, vn = decode_case(2, 2, 24, 64, [5, 23], torch.float32, True)
    kc_t, vc_t = kc.clone(), vc.clone()
    ops.decode_attention(q, kc_t, vc_t, sl, kn, vn, backend="triton")
    for b, pos in enumerate(sl.tolist()):
        assert torch.equal(kc_t[b, :, pos], kn[b]) and torch.equal(vc_t[b, :, pos], vn[b])
        keep = [t for t in range(24) if t != pos]
        assert torch.equal(kc_t[b, :, keep], kc[b, :, keep]) and torch.equal(vc_t[b, :, keep], vc[b, :, keep])
    assert sl.tolist() == [5, 23]


def test_decode_empty_without_append_is_zero():
    q, kc, vc, sl, _, _ = decode_case(2, 3, 16, 128, [0, 0], torch.float16, False)
    out = ops.decode_attention(q, kc, vc, sl, backend="triton")
    assert torch.equal(out, torch.zeros_like(out))


def test_decode_strided_caches_and_scale():
    # A cache slice along T_max (not dense) is fine: strides are followed, appends land in the base tensor.
    q, kc, vc, sl, kn, vn = decode_case(2, 2, 32, 64, [3, 19], torch.float32, True)
    big_k, big_v = rand(2, 2, 48, 64), rand(2, 2, 48, 64)
    big_k[:, :, :32], big_v[:, :, :32] = kc, vc
    out = ops.decode_attention(q, big_k[:, :, :32], big_v[:, :, :32], sl, kn, vn, scale=0.2, backend="triton")
    kc_r, vc_r = kc.clone(), vc.clone()
    assert_fa_close(out, reference.decode_attention(q, kc_r, vc_r, sl, kn, vn, 0.2))
    assert torch.equal(big_k[:, :, :32], kc_r) and torch.equal(big_v[:, :, :32], vc_r)


@pytest.mark.parametrize("same_new_strides", [True, False])
def test_decode_qkv_projection_views(same_new_strides):
    # q, k_new, v_new as the model passes them: [B, H, D] views of one [B, 3, H, D] projection (read in place),
    # or a v_new with other strides than k_new (both copied).
    b, h, d = 3, 2, 64
    q, kn, vn = rand(b, 3, h, d).unbind(1)
    if not same_new_strides:
        vn = vn.contiguous()
    _, kc, vc, sl, _, _ = decode_case(b, h, 20, d, [0, 7, 19], torch.float32, True)
    decode_parity(q, kc, vc, sl, kn, vn)
    decode_parity(q, kc, vc, sl, kn, vn, num_splits=3)


def test_decode_launch_arguments_do_not_change_between_steps(monkeypatch):
    # One compiled kernel (and one autotune key) for every decode step, and CUDA-graph replayable: the grid and
    # every non-tensor argument (ints are JIT-specialised, constexprs and autotune keys select the binary) must
    # not depend on the lengths, which the kernel reads from device memory.
    launches = []

    def record(kernel, tuned, grid, args, consts, config):
        plain = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
        launches.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), grid, plain, consts, config))
        real_launch(kernel, tuned, grid, args, consts, config)

    real_launch = decode_mod.launch
    monkeypatch.setattr(decode_mod, "launch", record)
    q, kc, vc, sl, kn, vn = decode_case(2, 2, 40, 32, [0, 3], torch.float16, True)
    steps = []
    for lengths in ([0, 3], [1, 4], [17, 38]):
        launches.clear()
        sl.copy_(torch.tensor(lengths, dtype=torch.int32))
        ops.decode_attention(q, kc, vc, sl, kn, vn, backend="triton")
        steps.append([(name, grid, plain, consts, str(cfg)) for name, grid, plain, consts, cfg in launches])
    assert len(steps[0]) == 2, "expected the split and the combine launch"
    assert steps[0] == steps[1] == steps[2]


@settings(max_examples=6, deadline=None)
@given(
    data=st.data(),
    b=st.integers(1, 3),
    h=st.integers(1, 2),
    t_max=st.integers(1, 70),
    append=st.booleans(),
)
def test_decode_hypothesis(data, b, h, t_max, append):
    hi = t_max - 1 if append else t_max
    if hi < 0:
        return
    seqlens = data.draw(st.lists(st.integers(0, hi), min_size=b, max_size=b))
    decode_parity(*decode_case(b, h, t_max, 64, seqlens, torch.float32, append))


# ---- torch.library registration -------------------------------------------------------------


def test_ops_trace_under_torch_compile():
    # aot_eager exercises the fake (meta) implementations and the declared cache mutation.  The backend
    # functions are called directly: the generic dispatcher's own traceability is not this file's subject.
    from gpt2fast.ops import triton as tb

    def step(x, w, bias, q, kc, vc, sl, kn, vn):
        y, h = tb.layer_norm(x, w, bias, 1e-5, x)
        g = tb.bias_gelu(tb.layer_norm(y, w, bias, 1e-5, None), bias)
        a = tb.attention(kc[:, :, :4], kc[:, :, :4], vc[:, :, :4], True, None)
        o = tb.decode_attention(q, kc, vc, sl, kn, vn, None)
        return g + h, a, o

    x, w, bias = rand(2, 64), rand(64), rand(64)
    q, kc, vc, sl, kn, vn = decode_case(2, 2, 8, 32, [2, 5], torch.float32, True)
    kc_e, vc_e = kc.clone(), vc.clone()
    eager = step(x, w, bias, q, kc_e, vc_e, sl, kn, vn)
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(x, w, bias, q, kc, vc, sl, kn, vn)
    for e, c in zip(eager, compiled, strict=True):
        assert torch.equal(e, c)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e), "the cache append must survive compilation"


@pytest.mark.parametrize("name", ["layer_norm", "add_layer_norm", "bias_gelu", "attention", "decode_attention"])
def test_opcheck(name):
    # torch.library.opcheck: schema (incl. mutates_args), fake tensor and autograd registration checks.
    x, w, b = rand(2, 64), rand(64), rand(64)
    q, kc, vc, sl, kn, vn = decode_case(2, 2, 8, 32, [2, 7], torch.float32, True)
    args = {
        "layer_norm": (x, w, b, 1e-5),
        "add_layer_norm": (x, x.clone(), w, b, 1e-5),
        "bias_gelu": (x, b),
        "attention": (kc, kc.clone(), vc, True, 0.25),
        "decode_attention": (q, kc, vc, sl, kn, vn, 0.25),
    }[name]
    torch.library.opcheck(getattr(torch.ops.gpt2fast_triton, name).default, args)


# ---- backend-specific bad input ------------------------------------------------------------


def test_attention_rejects_unsupported_head_dim():
    q = rand(1, 1, 8, 48)
    with pytest.raises(ValueError, match=r"head dims \(32, 64, 128\).*D=48"):
        ops.attention(q, q, q, backend="triton")


def test_decode_rejects_bad_head_dim_and_overlapping_cache_before_launch():
    q, kc, vc, sl, kn, vn = decode_case(1, 2, 8, 16, [3], torch.float32, True)
    kc_before = kc.clone()
    with pytest.raises(ValueError, match="D=16"):
        ops.decode_attention(q, kc, vc, sl, kn, vn, backend="triton")
    assert torch.equal(kc, kc_before), "nothing may be written before the error"
    q, kc, vc, sl, kn, vn = decode_case(1, 2, 8, 64, [3], torch.float32, True)
    shared_k = rand(1, 2, 1, 64).expand(1, 2, 8, 64)  # every position aliases one row
    before = shared_k.clone()
    with pytest.raises(ValueError, match="k_cache has overlapping strides"):
        ops.decode_attention(q, shared_k, vc, sl, kn, vn, backend="triton")
    assert torch.equal(shared_k, before), "nothing may be written before the error"


def test_rejects_strides_beyond_int32_slices():
    # The kernels index within a (batch, head) slice with int32; meta tensors carry the strides without memory.
    attention_mod = importlib.import_module("gpt2fast.ops.triton.attention")
    ok = torch.empty(1, 2, 64, 64, device="meta")
    huge = torch.empty_strided((1, 2, 64, 64), (2**40, 2**36, 2**26, 1), device="meta")
    attention_mod.check(ok, ok, ok)
    with pytest.raises(ValueError, match=r"v has strides .* int32"):
        attention_mod.check(ok, ok, huge)
    with pytest.raises(ValueError, match=r"k_cache has strides .* int32"):
        decode_mod.check(ok[:, :, 0], huge, ok)


@pytest.mark.parametrize("bh", [(65536, 1), (1, 65536)])
def test_attention_rejects_batch_or_heads_beyond_grid_limit(bh):
    attention_mod = importlib.import_module("gpt2fast.ops.triton.attention")
    attention_mod.check(*(torch.empty(65535, 65535, 1, 32, device="meta"),) * 3)
    q = torch.empty(*bh, 1, 32, device="meta")
    with pytest.raises(ValueError, match=f"B={bh[0]}, H={bh[1]}"):
        attention_mod.check(q, q, q)


def test_layer_norm_rejects_too_wide_rows():
    x = rand(1, 16385)
    with pytest.raises(ValueError, match="N must be <= 16384"):
        ops.layer_norm(x, x[0], x[0], backend="triton")


# ---- launch-config policy (no kernel runs) -------------------------------------------------

attention_mod = importlib.import_module("gpt2fast.ops.triton.attention")
common_mod = importlib.import_module("gpt2fast.ops.triton._common")


@pytest.fixture
def gpu_capability(monkeypatch):
    """Pretend the CUDA device has a given compute capability: call with (major, minor)."""

    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        common_mod.tuning_arch.cache_clear()

    yield set_capability
    common_mod.tuning_arch.cache_clear()


def pruned(mod, cap, set_capability, dtype, head_dim):
    """The tiles ``mod``'s autotune prune hook keeps for a launch on a GPU of capability ``cap``."""
    set_capability(cap)
    q = types.SimpleNamespace(dtype=dtype, device=torch.device("cuda", 0))  # only dtype and device are read
    return [mod._tile(c) for c in mod._prune(mod._CONFIGS, {"Q": q}, HEAD_DIM=head_dim)]


@pytest.mark.parametrize("mod", [attention_mod, decode_mod], ids=["attention", "decode"])
@pytest.mark.parametrize("cap,arch", [((8, 0), 80), ((8, 6), 80), ((9, 0), 90), ((10, 0), 90)])
def test_autotune_prune_follows_the_gpu_generation(mod, cap, arch, gpu_capability):
    # The prune hook reads the launch device's capability and keeps that target's spill-free tiles (never none).
    for dtype in DTYPES:
        for d in (32, 64, 128):
            kept = pruned(mod, cap, gpu_capability, dtype, d)
            assert kept, f"nothing left for {dtype} D={d} on {cap}"
            assert kept == mod.tiles(dtype, d, arch)


def test_prune_drops_sm80_spills_and_keeps_sm90_gpt2_tiles(gpu_capability):
    # Measured by benchmarks/compile_check.py --full (triton 3.9): these spill registers on sm_80 ...
    sm80_spills = {
        32: {(128, 32, 4, 3)},
        64: {(128, 64, 4, 3)},
        128: {(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2)},
    }
    for dtype in (torch.float16, torch.bfloat16):
        for d, bad in sm80_spills.items():
            assert not bad & set(pruned(attention_mod, (8, 0), gpu_capability, dtype, d))
        # ... while on sm_90 nothing spills for GPT-2's head dim, so every fp16/bf16 tile stays.
        assert pruned(attention_mod, (9, 0), gpu_capability, dtype, 64) == list(attention_mod._HALF_TILES)
    assert (64, 2, 3) not in pruned(decode_mod, (8, 0), gpu_capability, torch.float16, 128)
    assert (128, 4, 2) not in pruned(decode_mod, (9, 0), gpu_capability, torch.float32, 128)
    assert pruned(decode_mod, (9, 0), gpu_capability, torch.float16, 64) == list(decode_mod._TILES)


@pytest.mark.parametrize("arch", common_mod.SPILL_CHECKED_ARCHS)
def test_compile_cases_mirror_what_a_gpu_can_launch(arch, monkeypatch):
    # benchmarks/compile_check.py compiles compile_cases(full=True, arch) for each target: exactly the pruned
    # autotune tiles plus the heuristic config of each dtype x head dim (as on a GPU, not the interpreter's).
    monkeypatch.setattr(attention_mod, "interpreting", lambda: False)
    monkeypatch.setattr(decode_mod, "interpreting", lambda: False)
    for mod, kernel in ((attention_mod, "attention"), (decode_mod, "decode_split")):
        cases = [c for c in mod.compile_cases(True, arch) if c.kernel == kernel]
        for dtype, tname in common_mod.TL_DTYPE.items():
            for d in (32, 64, 128):
                if mod is attention_mod:
                    heur = attention_mod.heuristic_config(d, dtype, arch)
                else:
                    heur = decode_mod.heuristic_config(d)
                want = set(mod.tiles(dtype, d, arch)) | {mod._tile(heur)}
                mine = [c for c in cases if c.label.startswith(f"{tname} D={d} ")]
                assert {got_tile(c) for c in mine} == want, f"{kernel} {tname} D={d} sm_{arch}"
                assert all(c.heuristic == (got_tile(c) == mod._tile(heur)) for c in mine)


def got_tile(case):
    """(BLOCK_M?, BLOCK_N, warps, stages) of a compile case, like the modules' ``_tile``."""
    blocks = tuple(case.constexprs[k] for k in ("BLOCK_M", "BLOCK_N") if k in case.constexprs)
    return (*blocks, case.num_warps, case.num_stages)


# ---- GPU-only, larger shapes (skipped without CUDA) -----------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4096, 1600), (8, 1024, 768)])
def test_gpu_layer_norm_and_gelu_large(dtype, shape):
    x, r = rand(*shape, dtype=dtype), rand(*shape, dtype=dtype)
    w, b = rand(shape[-1], dtype=dtype), rand(shape[-1], dtype=dtype)
    out = ops.layer_norm(x, w, b, residual=r, backend="triton")
    check(out, reference.layer_norm(up(x), up(w), up(b), 1e-5, up(r)), reference.layer_norm(x, w, b, 1e-5, r))
    g = rand(shape[0], 4 * shape[-1], dtype=dtype)
    bg = rand(4 * shape[-1], dtype=dtype)
    check(ops.bias_gelu(g, bg, backend="triton"), reference.bias_gelu(up(g), up(bg)), reference.bias_gelu(g, bg))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 12, 4096, 64), (4, 25, 1000, 64), (2, 16, 1031, 128), (8, 12, 257, 32)])
def test_gpu_attention_large(dtype, shape):
    attention_parity(*(rand(*shape, dtype=dtype) for _ in range(3)), True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bh", [(1, 12), (32, 24)])
def test_gpu_decode_large(dtype, bh):
    b, h = bh
    t_max = 4096
    seqlens = torch.randint(0, t_max - 1, (b,)).tolist()
    seqlens[0] = t_max - 1
    decode_parity(*decode_case(b, h, t_max, 64, seqlens, dtype, True))


@pytest.mark.gpu
def test_gpu_more_than_65535_batch_heads():
    # Grid dims 1 and 2 stop at 65535: B*H = 69632 must not land on one of them (launch error otherwise).
    b, h = 4096, 17
    attention_parity(*(rand(b, h, 16, 32, dtype=torch.float16) for _ in range(3)), True)
    decode_parity(*decode_case(b, h, 16, 32, [15] * b, torch.float16, True))


@pytest.mark.gpu
@pytest.mark.parametrize("autotune", ["1", "0"])
def test_gpu_decode_cuda_graph_replay(autotune, monkeypatch):
    # Autotuning (when on) must finish in the warm-up: a capture that tuned would synchronise and fail.
    monkeypatch.setenv("GPT2FAST_AUTOTUNE", autotune)
    q, kc, vc, sl, kn, vn = decode_case(2, 12, 256, 64, [10, 200], torch.float16, True)
    static = [t.clone() for t in (q, kc, vc, sl, kn, vn)]
    ops.decode_attention(*static, backend="triton")  # warm up (autotune, compile) outside the graph
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.decode_attention(*static, backend="triton")
    for lengths in ([11, 201], [0, 255]):  # nothing about the lengths is baked into the graph
        static[3].copy_(torch.tensor(lengths, dtype=torch.int32, device=DEVICE))
        g.replay()
        torch.cuda.synchronize()
        kc_r, vc_r = static[1].clone(), static[2].clone()
        assert_fa_close(out, reference.decode_attention(static[0], kc_r, vc_r, static[3], static[4], static[5]))


@pytest.mark.gpu
def test_gpu_autotuned_ops_at_gpt2_small_shapes(monkeypatch):
    # The autotuned path (whatever config wins) at GPT-2 small's shapes, even when the run disables autotuning.
    monkeypatch.setenv("GPT2FAST_AUTOTUNE", "1")
    dt = torch.float16
    x, r, w, b = rand(512, 768, dtype=dt), rand(512, 768, dtype=dt), rand(768, dtype=dt), rand(768, dtype=dt)
    out = ops.layer_norm(x, w, b, residual=r, backend="triton")
    check(out, reference.layer_norm(up(x), up(w), up(b), 1e-5, up(r)), reference.layer_norm(x, w, b, 1e-5, r))
    g, bg = rand(512, 3072, dtype=dt), rand(3072, dtype=dt)
    check(ops.bias_gelu(g, bg, backend="triton"), reference.bias_gelu(up(g), up(bg)), reference.bias_gelu(g, bg))
    attention_parity(*(rand(2, 12, 300, 64, dtype=dt) for _ in range(3)), True)
    decode_parity(*decode_case(4, 12, 1024, 64, [0, 1, 700, 1023], dt, True))
