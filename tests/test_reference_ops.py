"""The reference backend against independent PyTorch implementations, the ops' argument checks,
and backend selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2fast import ops
from gpt2fast.ops import BACKENDS, BackendUnavailableError
from gpt2fast.testing import assert_fa_close

REF = "reference"
LOW = [torch.float16, torch.bfloat16]


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ---- values ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 17, 16), (1, 2, 33, 64)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_sdpa(shape, causal):
    q, k, v = (_randn(*shape) for _ in range(3))
    out = ops.attention(q, k, v, causal=causal, backend=REF)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal), atol=1e-5, rtol=1e-5)
    scaled = ops.attention(q, k, v, causal=causal, scale=0.3, backend=REF)
    assert torch.allclose(scaled, F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3), atol=1e-5)


@pytest.mark.parametrize("dtype", LOW)
def test_attention_low_precision_fa_rule(dtype):
    q, k, v = (_randn(2, 3, 19, 32) for _ in range(3))
    ref32 = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    low = [t.to(dtype) for t in (q, k, v)]
    base = F.scaled_dot_product_attention(*low, is_causal=True)
    assert_fa_close(ops.attention(*low, backend=REF), ref32, base)


@pytest.mark.parametrize("shape", [(1, 8), (3, 5, 1600), (7, 64)])
def test_layer_norm_matches_torch(shape):
    x, res = _randn(*shape), _randn(*shape)
    w, b = _randn(shape[-1]), _randn(shape[-1])
    expected = F.layer_norm(x, (shape[-1],), w, b, 1e-5)
    assert torch.allclose(ops.layer_norm(x, w, b, backend=REF), expected, atol=1e-5, rtol=1e-5)
    y, h = ops.layer_norm(x, w, b, eps=1e-3, residual=res, backend=REF)
    assert torch.equal(h, x + res)
    assert torch.allclose(y, F.layer_norm(x + res, (shape[-1],), w, b, 1e-3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", LOW)
def test_layer_norm_low_precision_fa_rule(dtype):
    x, w, b = _randn(4, 1600), _randn(1600), _randn(1600)
    ref32 = F.layer_norm(x, (1600,), w, b)
    base = F.layer_norm(x.to(dtype), (1600,), w.to(dtype), b.to(dtype))
    assert_fa_close(ops.layer_norm(x.to(dtype), w.to(dtype), b.to(dtype), backend=REF), ref32, base)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7, 100), (2, 1600)])
def test_bias_gelu_matches_torch(shape):
    x, b = _randn(*shape) * 3, _randn(shape[-1])
    expected = F.gelu(x + b, approximate="tanh")
    assert torch.allclose(ops.bias_gelu(x, b, backend=REF), expected, atol=1e-5, rtol=1e-5)
    for dtype in LOW:
        base = F.gelu(x.to(dtype) + b.to(dtype), approximate="tanh")
        assert_fa_close(ops.bias_gelu(x.to(dtype), b.to(dtype), backend=REF), expected, base, msg=str(dtype))


def _prefix_attention(q, k_cache, v_cache, lengths):
    """Each sequence's query against its first ``lengths[b]`` cache positions, by SDPA."""
    rows = []
    for b, n in enumerate(lengths):
        k, v = k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n]
        rows.append(F.scaled_dot_product_attention(q[b : b + 1, :, None], k, v)[:, :, 0])
    return torch.cat(rows)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_decode_attention_equals_attention_over_the_prefix(dtype):
    B, H, T, D = 4, 3, 13, 16
    q, kc, vc = _randn(B, H, D), _randn(B, H, T, D), _randn(B, H, T, D)
    lengths = [1, 7, 13, 4]  # incl. a full cache
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    ref32 = _prefix_attention(q, kc, vc, lengths)
    low = [t.to(dtype) for t in (q, kc, vc)]
    out = ops.decode_attention(*low, seqlens, backend=REF)
    assert_fa_close(out, ref32, _prefix_attention(*low, lengths))
    assert seqlens.tolist() == lengths


def test_decode_attention_appends_at_seqlens():
    B, H, T, D = 3, 2, 6, 8
    q, kc, vc = _randn(B, H, D), _randn(B, H, T, D), _randn(B, H, T, D)
    k_new, v_new = _randn(B, H, D), _randn(B, H, D)
    lengths = [0, 2, 5]  # incl. an empty cache and the last free slot
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    out = ops.decode_attention(q, kc, vc, seqlens, k_new, v_new, backend=REF)
    assert seqlens.tolist() == lengths  # not modified
    for b, n in enumerate(lengths):
        assert torch.equal(kc[b, :, n], k_new[b]) and torch.equal(vc[b, :, n], v_new[b])
        others = [t for t in range(T) if t != n]
        assert torch.equal(kc[b, :, others], kc0[b, :, others]) and torch.equal(vc[b, :, others], vc0[b, :, others])
    expected = _prefix_attention(q, kc, vc, [n + 1 for n in lengths])
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_attention_with_nothing_to_attend_is_zero():
    q, kc, vc = _randn(2, 1, 4), _randn(2, 1, 3, 4), _randn(2, 1, 3, 4)
    out = ops.decode_attention(q, kc, vc, torch.tensor([0, 2], dtype=torch.int32), backend=REF)
    assert torch.equal(out[0], torch.zeros(1, 4)) and out[1].abs().sum() > 0


# ---- argument checks ----------------------------------------------------------------------------
def _ln_args(**over):
    args = dict(x=_randn(2, 8), weight=_randn(8), bias=_randn(8))
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, err, match",
    [
        (dict(x=torch.ones(2, 8, dtype=torch.int64)), TypeError, "x must be float32"),
        (dict(x=_randn(2, 8).double()), TypeError, "x must be float32"),
        (dict(weight=_randn(8, dtype=torch.float16)), TypeError, "weight has dtype"),
        (dict(bias=_randn(7)), ValueError, r"bias must have shape \[8\]"),
        (dict(residual=_randn(2, 7)), ValueError, "residual must have shape"),
        (dict(x=_randn(0, 8)), ValueError, "x is empty"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(weight=torch.empty(8, device="meta")), RuntimeError, "weight is on meta"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    ],
)
def test_layer_norm_bad_inputs(over, err, match):
    with pytest.raises(err, match=match):
        ops.layer_norm(**_ln_args(**over), backend=REF)


@pytest.mark.parametrize(
    "x, bias, err, match",
    [
        (_randn(2, 8), _randn(9), ValueError, r"bias must have shape \[8\]"),
        (_randn(2, 8), _randn(8, dtype=torch.bfloat16), TypeError, "bias has dtype"),
        (torch.ones(2, 8, dtype=torch.int32), _randn(8), TypeError, "x must be float32"),
        (_randn(2, 0), _randn(0), ValueError, "x is empty"),
    ],
)
def test_bias_gelu_bad_inputs(x, bias, err, match):
    with pytest.raises(err, match=match):
        ops.bias_gelu(x, bias, backend=REF)


@pytest.mark.parametrize(
    "q, k, kwargs, err, match",
    [
        (_randn(2, 3, 4), _randn(2, 3, 4), {}, ValueError, r"q must be 4-D \[B, H, T, D\]"),
        (_randn(1, 2, 3, 4), _randn(1, 2, 5, 4), {}, ValueError, r"k must have shape \[1, 2, 3, 4\]"),
        (_randn(1, 2, 3, 4), _randn(1, 2, 3, 4, dtype=torch.float16), {}, TypeError, "k has dtype"),
        (_randn(1, 2, 0, 4), _randn(1, 2, 0, 4), {}, ValueError, "q is empty"),
        (_randn(1, 2, 3, 4), _randn(1, 2, 3, 4), dict(causal=1), TypeError, "causal must be a bool"),
        (_randn(1, 2, 3, 4), _randn(1, 2, 3, 4), dict(scale=-1.0), ValueError, "scale"),
        (_randn(1, 2, 3, 4), torch.empty(1, 2, 3, 4, device="meta"), {}, RuntimeError, "one device"),
    ],
)
def test_attention_bad_inputs(q, k, kwargs, err, match):
    with pytest.raises(err, match=match):
        ops.attention(q, k, k, backend=REF, **kwargs)


def _dec(seqlens=(1, 2), **over):
    B, H, T, D = 2, 2, 4, 8
    args = dict(q=_randn(B, H, D), k_cache=_randn(B, H, T, D), v_cache=_randn(B, H, T, D))
    args["cache_seqlens"] = torch.tensor(seqlens, dtype=torch.int32)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "args, err, match",
    [
        (_dec(q=_randn(2, 2, 1, 8)), ValueError, r"q must be 3-D \[B, H, D\]"),
        (_dec(k_cache=_randn(2, 2, 4)), ValueError, r"k_cache must be 4-D"),
        (_dec(v_cache=_randn(2, 2, 5, 8)), ValueError, r"v_cache must have shape \[2, 2, 4, 8\]"),
        (_dec(k_cache=_randn(2, 2, 4, 8, dtype=torch.bfloat16)), TypeError, "k_cache has dtype"),
        (_dec(k_cache=_randn(2, 2, 0, 8), v_cache=_randn(2, 2, 0, 8)), ValueError, "T_max = 0"),
        (_dec(seqlens=(-1, 2)), ValueError, "negative"),
        (_dec(seqlens=(5, 2)), ValueError, "exceeds the cache"),
        (_dec(seqlens=(1, 2, 3)), ValueError, r"cache_seqlens must have shape \[2\]"),
        (_dec(cache_seqlens=torch.tensor([1, 2])), TypeError, "cache_seqlens must be int32"),
        (_dec(cache_seqlens=[1, 2]), TypeError, "cache_seqlens must be an int32 torch.Tensor"),
        (_dec(seqlens=(4, 1), k_new=_randn(2, 2, 8), v_new=_randn(2, 2, 8)), ValueError, "overflow"),
        (_dec(k_new=_randn(2, 2, 8)), ValueError, "together"),
        (_dec(k_new=_randn(2, 2, 7), v_new=_randn(2, 2, 7)), ValueError, r"k_new must have shape \[2, 2, 8\]"),
        (_dec(q=_randn(0, 2, 8)), ValueError, "q is empty"),
        (_dec(cache_seqlens=torch.ones(2, dtype=torch.int32, device="meta")), RuntimeError, "cache_seqlens is on"),
    ],
)
def test_decode_attention_bad_inputs(args, err, match):
    k_before = args["k_cache"].clone()
    with pytest.raises(err, match=match):
        ops.decode_attention(**args, backend=REF)
    assert torch.equal(args["k_cache"], k_before)  # nothing was written


def test_decode_attention_full_cache_limits():
    ops.decode_attention(**_dec(seqlens=(4, 4)), backend=REF)  # attend to a full cache: fine
    ops.decode_attention(**_dec(seqlens=(3, 0)), k_new=_randn(2, 2, 8), v_new=_randn(2, 2, 8), backend=REF)


# ---- backend selection -------------------------------------------------------------------------
@pytest.fixture
def clean_backend(monkeypatch):
    monkeypatch.delenv("GPT2FAST_BACKEND", raising=False)
    ops.set_backend(None)
    yield monkeypatch
    ops.set_backend(None)


def test_available_backends_lists_every_backend_with_a_reason(clean_backend):
    statuses = ops.available_backends("cpu")
    assert [s.name for s in statuses] == list(BACKENDS)
    assert all(isinstance(s.reason, str) and s.reason for s in statuses)
    assert {s.name: s.available for s in statuses}["reference"] is True
    assert not ops.backend_status("cuda", "cpu").available


def test_unknown_backend_is_rejected(clean_backend):
    x, b = _randn(2, 4), _randn(4)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.bias_gelu(x, b, backend="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("nope")
    assert ops.get_backend() == "auto"


def test_unavailable_backend_says_why(clean_backend):
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable for cpu tensors"):
        ops.bias_gelu(_randn(2, 4), _randn(4), backend="cuda")


def test_set_backend_and_env_var(clean_backend):
    x, b = _randn(2, 4), _randn(4)
    expected = F.gelu(x + b, approximate="tanh")
    clean_backend.setenv("GPT2FAST_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    assert torch.allclose(ops.bias_gelu(x, b), expected, atol=1e-6)
    clean_backend.setenv("GPT2FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        ops.bias_gelu(x, b)
    ops.set_backend("reference")  # overrides the env var
    assert ops.get_backend() == "reference"
    assert torch.allclose(ops.bias_gelu(x, b), expected, atol=1e-6)
    ops.set_backend(None)
    assert ops.get_backend() == "bogus"
    clean_backend.delenv("GPT2FAST_BACKEND")
    assert ops.get_backend() == "auto"
    assert torch.allclose(ops.bias_gelu(x, b), expected, atol=1e-6)  # auto on CPU = reference


def test_torch_compile_fullgraph_through_public_ops_after_first_use():
    """After one eager call resolves the backend, the public ops trace with fullgraph=True and agree."""
    x, w, b = torch.randn(4, 8), torch.rand(8) + 0.5, torch.randn(8)
    q = torch.randn(1, 2, 5, 32)

    def f(x, w, b, q):
        y, h = ops.layer_norm(x, w, b, residual=x, backend="reference")
        return y, h, ops.bias_gelu(x, b, backend="reference"), ops.attention(q, q, q, backend="reference")

    eager = f(x, w, b, q)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b, q)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(c, a)
