"""Randomized parity of every op on every backend against the fp32 reference (FlashAttention tolerance rule).

Hypothesis draws shapes (1 up to moderately large), dtypes, scales, causal flags, ragged cache lengths (including
0 and a full cache) and a seed for the values.  The reference backend is the oracle: each example compares the
backend's result with the reference op run in fp32, against the reference run in the input dtype as baseline
(``gpt2fast.testing.assert_fa_close``).

Backends: ``triton`` (Triton's interpreter on CPU, the GPU when there is one) and ``cuda`` (``gpu``-marked).
The number of examples comes from the Hypothesis profile (conftest: ``ci`` 50, ``extended`` 500, chosen by
``HYPOTHESIS_PROFILE``).  Shapes scale with ``GPT2FAST_PARITY_SIZE`` (default 1 under ``ci``, 4 under
``extended``, 16 on a GPU).  A failure prints the shapes and seed in the assertion message and a reproducer
blob (``print_blob``); replay it with ``@reproduce_failure`` or rerun with the printed seed.
"""

from __future__ import annotations

import os

import pytest
import torch
from _backends import DEVICE, backend_param
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt2fast import ops
from gpt2fast.ops import reference
from gpt2fast.testing import assert_fa_close

_DEFAULT_SIZE = "16" if DEVICE == "cuda" else ("4" if os.environ.get("HYPOTHESIS_PROFILE") == "extended" else "1")
#: Multiplies every drawn extent's upper bound (rows, widths, sequence lengths, cache lengths).
SIZE = max(1, int(os.environ.get("GPT2FAST_PARITY_SIZE", _DEFAULT_SIZE)))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [32, 64, 128]  # the head dims the triton and cuda kernels are built for
GPT2_WIDTHS = [768, 1024, 1280, 1600]


BACKENDS = [backend_param("triton"), backend_param("cuda", marks=[pytest.mark.gpu])]
# The kernels' tanh is 2/(1 + exp(-2x)) - 1: exp overflowing to inf for large |x| is intended (it saturates to
# ±1), but Triton's interpreter computes it with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)
scales = st.one_of(st.none(), st.floats(0.02, 1.0))


def rand(gen: torch.Generator, *shape: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    """Seeded normal values of ``shape`` in ``dtype`` on the test device."""
    return (torch.randn(*shape, generator=gen) * std).to(device=DEVICE, dtype=dtype)


def up(t: torch.Tensor | None) -> torch.Tensor | None:
    """fp32 copy (for the fp32 reference); None stays None."""
    return None if t is None else t.float()


def check(out, ref32, base, msg: str) -> None:
    """The FA rule on one tensor or on matching tuples."""
    for o, r, b in zip(*(t if isinstance(t, tuple) else (t,) for t in (out, ref32, base)), strict=True):
        assert_fa_close(o, r, b, msg=msg)


# ----------------------------------------------------------------------------- layer_norm / bias_gelu
@pytest.mark.parametrize("backend", BACKENDS)
@settings()
@given(
    lead=st.lists(st.integers(1, 3 * SIZE), min_size=0, max_size=2),
    n=st.one_of(st.integers(1, 300 * SIZE), st.sampled_from(GPT2_WIDTHS)),
    dtype=dtypes,
    residual=st.booleans(),
    std=st.sampled_from([0.1, 1.0, 10.0]),
    eps=st.sampled_from([1e-5, 1e-3]),
    seed=seeds,
)
def test_layer_norm(backend, lead, n, dtype, residual, std, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = rand(gen, *lead, n, dtype=dtype, std=std)
    w, b = rand(gen, n, dtype=dtype), rand(gen, n, dtype=dtype)
    r = rand(gen, *lead, n, dtype=dtype, std=std) if residual else None
    out = ops.layer_norm(x, w, b, eps, residual=r, backend=backend)
    msg = f"layer_norm {backend} shape={tuple(x.shape)} {dtype} residual={residual} std={std} eps={eps} seed={seed}"
    check(out, reference.layer_norm(up(x), up(w), up(b), eps, up(r)), reference.layer_norm(x, w, b, eps, r), msg)


@pytest.mark.parametrize("backend", BACKENDS)
@settings()
@given(
    lead=st.lists(st.integers(1, 3 * SIZE), min_size=0, max_size=2),
    n=st.one_of(st.integers(1, 600 * SIZE), st.sampled_from([3072, 4096, 5120, 6400])),
    dtype=dtypes,
    std=st.sampled_from([0.5, 3.0, 30.0]),
    seed=seeds,
)
def test_bias_gelu(backend, lead, n, dtype, std, seed):
    gen = torch.Generator().manual_seed(seed)
    x, bias = rand(gen, *lead, n, dtype=dtype, std=std), rand(gen, n, dtype=dtype)
    out = ops.bias_gelu(x, bias, backend=backend)
    msg = f"bias_gelu {backend} shape={tuple(x.shape)} {dtype} std={std} seed={seed}"
    check(out, reference.bias_gelu(up(x), up(bias)), reference.bias_gelu(x, bias), msg)


# ----------------------------------------------------------------------------- attention
@pytest.mark.parametrize("backend", BACKENDS)
@settings()
@given(
    b=st.integers(1, 2),
    h=st.integers(1, 2 * SIZE),
    t=st.integers(1, 160 * SIZE),
    d=st.sampled_from(HEAD_DIMS),
    causal=st.booleans(),
    dtype=dtypes,
    scale=scales,
    seed=seeds,
)
def test_attention(backend, b, h, t, d, causal, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (rand(gen, b, h, t, d, dtype=dtype) for _ in range(3))
    out = ops.attention(q, k, v, causal, scale, backend=backend)
    ref32 = reference.attention(up(q), up(k), up(v), causal, scale)
    msg = f"attention {backend} [B,H,T,D]={[b, h, t, d]} {dtype} causal={causal} scale={scale} seed={seed}"
    check(out, ref32, reference.attention(q, k, v, causal, scale), msg)


# ----------------------------------------------------------------------------- decode_attention
@st.composite
def decode_shapes(draw):
    """``(b, h, t_max, d, append, seqlens)`` with ragged lengths that include 0 and a full cache often."""
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 2 * SIZE))
    t_max, append = draw(st.integers(1, 64 * SIZE)), draw(st.booleans())
    hi = t_max - 1 if append else t_max  # appending needs one free slot
    lengths = st.one_of(st.just(0), st.just(hi), st.integers(0, hi))
    return b, h, t_max, draw(st.sampled_from(HEAD_DIMS)), append, draw(st.lists(lengths, min_size=b, max_size=b))


@pytest.mark.parametrize("backend", BACKENDS)
@settings()
@given(shape=decode_shapes(), dtype=dtypes, scale=scales, seed=seeds)
def test_decode_attention(backend, shape, dtype, scale, seed):
    b, h, t_max, d, append, seqlens = shape
    gen = torch.Generator().manual_seed(seed)
    q = rand(gen, b, h, d, dtype=dtype)
    kc, vc = rand(gen, b, h, t_max, d, dtype=dtype), rand(gen, b, h, t_max, d, dtype=dtype)
    kn, vn = (rand(gen, b, h, d, dtype=dtype), rand(gen, b, h, d, dtype=dtype)) if append else (None, None)
    sl = torch.tensor(seqlens, dtype=torch.int32, device=DEVICE)
    msg = f"decode {backend} [B,H,T_max,D]={[b, h, t_max, d]} seqlens={seqlens} append={append} {dtype} "
    msg += f"scale={scale} seed={seed}"

    kc_o, vc_o, sl_o = kc.clone(), vc.clone(), sl.clone()
    out = ops.decode_attention(q, kc_o, vc_o, sl_o, kn, vn, scale, backend=backend)
    kc_b, vc_b = kc.clone(), vc.clone()
    base = reference.decode_attention(q, kc_b, vc_b, sl, kn, vn, scale)
    ref32 = reference.decode_attention(up(q), up(kc), up(vc), sl, up(kn), up(vn), scale)
    check(out, ref32, base, msg)
    assert torch.equal(sl_o, sl), f"cache_seqlens was modified: {msg}"
    assert torch.equal(kc_o, kc_b) and torch.equal(vc_o, vc_b), f"caches differ from the reference append: {msg}"
    for i, n in enumerate(seqlens):
        if n == 0 and not append:
            assert torch.equal(out[i], torch.zeros_like(out[i])), f"sequence {i} attends nothing, not zero: {msg}"
