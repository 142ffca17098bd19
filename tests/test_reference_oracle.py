"""The parity oracle itself: each op's reference implementation against independent PyTorch implementations
(SDPA, ``F.layer_norm``, ``F.gelu``, attention over a cache prefix), so the conformance suite compares the
kernels with something that is right.  (Argument checks: the specs' bad inputs in test_ops_conformance.py;
backend selection: test_registry.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2fast import ops
from gpt2fast.testing import EPS, assert_fa_close, fa_check, oracle_dtype, upcast

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


# ---- the oracle's precision ------------------------------------------------------------------
def test_the_oracle_runs_above_the_tested_precision():
    """fp32 inputs get an fp64 oracle, fp16/bf16 ones (even beside an fp32 tensor, attention_backward's lse) an
    fp32 one; integer tensors and scalars pass through unchanged."""
    lens, x32, lse = torch.tensor([3], dtype=torch.int32), torch.randn(2, 3), torch.randn(2)
    wide = upcast(dict(x=x32, seqlens=lens, eps=1e-5))
    assert (wide["x"].dtype, wide["seqlens"].dtype, wide["eps"]) == (torch.float64, torch.int32, 1e-5)
    assert torch.equal(wide["x"], x32.double())
    for dtype in LOW:
        assert oracle_dtype(dict(q=x32.to(dtype), lse=lse)) == torch.float32
        assert {t.dtype for t in upcast(dict(q=x32.to(dtype), lse=lse)).values()} == {torch.float32}


def test_an_fp32_result_is_judged_against_the_fp64_oracle():
    """One-column LayerNorm: the exact dweight is 0, PyTorch's fp32 backward is off by more than the rule's eps, so
    the exact answer passes only against the fp64 oracle (with PyTorch's fp32 as the baseline), as it should."""
    gen = torch.Generator().manual_seed(0)
    h, g, w = (torch.randn(2, 1, generator=gen) * 10, torch.randn(2, 1, generator=gen), torch.ones(1))
    inputs = dict(grad_y=g, h=h, weight=w, eps=1e-5, grad_h=None)
    spec = ops.get_spec("layer_norm_backward")
    base_dw, oracle_dw = spec.run_reference(inputs)[1], spec.run_reference(upcast(inputs))[1]
    assert oracle_dw.dtype == torch.float64 and oracle_dw.abs().max() < 1e-9
    assert base_dw.abs().max() > EPS[torch.float32]  # PyTorch's own fp32 rounding, beyond eps
    assert fa_check(torch.zeros(1), oracle_dw, base_dw).ok
    assert not fa_check(torch.zeros(1), base_dw.double(), base_dw).ok  # the old fp32 oracle failed the exact 0
