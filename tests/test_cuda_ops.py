"""GPU parity tests of the CUDA C++ backend against the reference backend (FlashAttention's rule).

``ref32`` = the reference op on fp32 copies of the inputs, ``base`` = the reference op in the
low dtype; every output must satisfy ``assert_fa_close(out, ref32, base)``.  Odd shapes on
purpose: N = 1600 and N not a multiple of the vector width, T = 1, T not a multiple of the tile,
ragged and full caches, empty sequences, D = 32/64/128.  Also: a whole tiny GPT-2, CUDA-graph
capture + replay of decode attention, and torch.compile through the custom ops.

All tests need a CUDA device and the built extension; a GPU machine without the extension fails
(it does not skip), so a broken build cannot pass silently.
"""

from __future__ import annotations

import copy

import pytest
import torch

from gpt2fast import GPT2, ops
from gpt2fast.config import GPT2Config
from gpt2fast.ops import reference
from gpt2fast.testing import assert_fa_close

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DEV = "cuda"


@pytest.fixture(autouse=True)
def _cuda_backend_available():
    status = ops.backend_status("cuda", DEV)
    assert status.available, f"the cuda backend must be available on a GPU machine: {status.reason}"


def _f32(*ts):
    return [None if t is None else t.float() for t in ts]


# ----------------------------------------------------------------------------- layer norm
LN_SHAPES = [(1, 768), (3, 5, 1600), (2, 8192), (4, 33), (7, 100), (2, 3, 24), (5, 1), (300, 64), (2, 12288)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LN_SHAPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_layer_norm(dtype, shape, with_residual):
    n = shape[-1]
    x = torch.randn(shape, device=DEV, dtype=dtype) * 2 + 0.5
    r = torch.randn(shape, device=DEV, dtype=dtype) if with_residual else None
    w = torch.randn(n, device=DEV, dtype=dtype)
    b = torch.randn(n, device=DEV, dtype=dtype)
    out = ops.layer_norm(x, w, b, 1e-5, residual=r, backend="cuda")
    ref32 = reference.layer_norm(*_f32(x, w, b), 1e-5, *_f32(r))
    base = reference.layer_norm(x, w, b, 1e-5, r)
    if with_residual:
        assert_fa_close(out[0], ref32[0], base[0], msg=f"y {shape}")
        assert_fa_close(out[1], ref32[1], base[1], msg=f"h {shape}")
    else:
        assert_fa_close(out, ref32, base, msg=f"{shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_large_mean_and_row_stride(dtype):
    """|mean| >> std (variance cancellation) and rows with a stride wider than N."""
    big = torch.randn(6, 2000, device=DEV, dtype=dtype) * 0.1 + 30
    x = big[:, :1600]
    r = torch.randn(6, 2000, device=DEV, dtype=dtype)[:, 8:1608]  # offset view: scalar path
    w = torch.rand(1600, device=DEV, dtype=dtype) + 0.5
    b = torch.randn(1600, device=DEV, dtype=dtype)
    y, h = ops.layer_norm(x, w, b, 1e-5, residual=r, backend="cuda")
    y32, h32 = reference.layer_norm(*_f32(x, w, b), 1e-5, r.float())
    yb, hb = reference.layer_norm(x, w, b, 1e-5, r)
    assert_fa_close(y, y32, yb)
    assert_fa_close(h, h32, hb)
    y = ops.layer_norm(x, w, b, 1e-5, backend="cuda")
    assert_fa_close(y, reference.layer_norm(*_f32(x, w, b), 1e-5), reference.layer_norm(x, w, b, 1e-5))


# ----------------------------------------------------------------------------- bias + gelu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3072), (3, 7, 3072), (5, 1601), (2, 6400), (1, 1), (9, 12)])
def test_bias_gelu(dtype, shape):
    x = torch.randn(shape, device=DEV, dtype=dtype) * 3
    bias = torch.randn(shape[-1], device=DEV, dtype=dtype)
    out = ops.bias_gelu(x, bias, backend="cuda")
    assert_fa_close(out, reference.bias_gelu(x.float(), bias.float()), reference.bias_gelu(x, bias), msg=f"{shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_row_stride(dtype):
    x = torch.randn(4, 4096, device=DEV, dtype=dtype)[:, :3072]
    bias = torch.randn(3072, device=DEV, dtype=dtype)
    out = ops.bias_gelu(x, bias, backend="cuda")
    assert_fa_close(out, reference.bias_gelu(x.float(), bias.float()), reference.bias_gelu(x, bias))


# ----------------------------------------------------------------------------- prefill attention
ATTN_SHAPES = [(1, 1, 1, 64), (2, 3, 17, 64), (1, 2, 64, 32), (2, 2, 100, 128), (1, 4, 257, 64), (1, 2, 129, 32)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
@pytest.mark.parametrize("causal", [True, False])
def test_attention(dtype, shape, causal):
    q, k, v = (torch.randn(shape, device=DEV, dtype=dtype) for _ in range(3))
    out = ops.attention(q, k, v, causal=causal, backend="cuda")
    ref32 = reference.attention(q.float(), k.float(), v.float(), causal)
    base = reference.attention(q, k, v, causal)
    assert_fa_close(out, ref32, base, msg=f"{shape} causal={causal}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_long_and_scaled(dtype):
    q, k, v = (torch.randn(1, 12, 1024, 64, device=DEV, dtype=dtype) for _ in range(3))
    out = ops.attention(q, k, v, causal=True, scale=0.3, backend="cuda")
    assert_fa_close(
        out, reference.attention(q.float(), k.float(), v.float(), True, 0.3), reference.attention(q, k, v, True, 0.3)
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_strided_views(dtype):
    """q/k/v as the model's views of one QKV tensor ([B, T, 3, H, D] -> [B, H, T, D])."""
    B, T, H, D = 2, 45, 4, 64
    qkv = torch.randn(B, T, 3, H, D, device=DEV, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    out = ops.attention(q, k, v, causal=True, backend="cuda")
    assert_fa_close(out, reference.attention(q.float(), k.float(), v.float(), True), reference.attention(q, k, v, True))


# ----------------------------------------------------------------------------- decode attention
def _decode_case(b, h, t_max, d, dtype, seqlens, append):
    q = torch.randn(b, h, d, device=DEV, dtype=dtype)
    kc = torch.randn(b, h, t_max, d, device=DEV, dtype=dtype)
    vc = torch.randn(b, h, t_max, d, device=DEV, dtype=dtype)
    sl = torch.tensor(seqlens, device=DEV, dtype=torch.int32)
    kn = torch.randn(b, h, d, device=DEV, dtype=dtype) if append else None
    vn = torch.randn(b, h, d, device=DEV, dtype=dtype) if append else None
    return q, kc, vc, sl, kn, vn


def _check_decode(q, kc, vc, sl, kn, vn, scale=None):
    kc32, vc32, kcb, vcb = kc.float().clone(), vc.float().clone(), kc.clone(), vc.clone()
    ref32 = reference.decode_attention(q.float(), kc32, vc32, sl, *_f32(kn, vn), scale)
    base = reference.decode_attention(q, kcb, vcb, sl, kn, vn, scale)
    sl_before = sl.clone()
    out = ops.decode_attention(q, kc, vc, sl, kn, vn, scale, backend="cuda")
    assert torch.equal(sl, sl_before), "cache_seqlens must not be modified"
    assert_fa_close(out, ref32, base, msg=f"seqlens={sl.tolist()} T_max={kc.shape[2]}")
    assert torch.equal(kc, kcb) and torch.equal(vc, vcb), "the cache append differs from the reference's"
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("append", [True, False])
def test_decode_ragged(dtype, d, append):
    _check_decode(*_decode_case(4, 3, 100, d, dtype, [0, 1, 57, 98], append))


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_full_cache(dtype):
    _check_decode(*_decode_case(2, 2, 64, 64, dtype, [64, 64], False))
    _check_decode(*_decode_case(2, 2, 64, 64, dtype, [63, 10], True))  # the append fills the cache


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_empty_sequence_is_zero(dtype):
    out = _check_decode(*_decode_case(3, 2, 16, 64, dtype, [0, 5, 0], False))
    assert torch.count_nonzero(out[0]) == 0 and torch.count_nonzero(out[2]) == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,t_max", [(1, 1, 4096), (2, 12, 2048), (64, 12, 300), (1, 25, 1)])
def test_decode_split_counts(dtype, b, h, t_max):
    """Many splits (small B·H, long cache), one split (large B·H) and T_max = 1."""
    gen = torch.Generator().manual_seed(b * h + t_max)
    seqlens = torch.randint(0, t_max, (b,), generator=gen).tolist()
    seqlens[0] = t_max - 1  # one sequence whose append lands on the last slot
    _check_decode(*_decode_case(b, h, t_max, 64, dtype, seqlens, True), scale=0.2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_append_on_split_boundaries(dtype):
    """The append slot at the first and last position of a split, next to empty splits (lse = -inf)."""
    from gpt2fast.ops import cuda

    b, h, t_max = 5, 1, 4096
    splits = cuda.choose_splits(b * h, t_max, cuda._num_sms(torch.cuda.current_device()))
    chunk = -(-t_max // splits)
    assert splits > 2, "this case needs several splits"
    seqlens = [chunk - 1, chunk, 2 * chunk - 1, 0, t_max - 1]
    _check_decode(*_decode_case(b, h, t_max, 64, dtype, seqlens, True))
    _check_decode(*_decode_case(b, h, t_max, 64, dtype, [chunk, chunk + 1, 2 * chunk, 0, t_max], False))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_keeps_current_device():
    """A launch on another device (custom op called directly, as compiled code does) leaves the current device."""
    from gpt2fast.ops import cuda

    x = torch.randn(3, 64, device="cuda:1")
    w, b = torch.ones(64, device="cuda:1"), torch.zeros(64, device="cuda:1")
    with torch.cuda.device(0):
        y = cuda._layer_norm_op(x, w, b, 1e-5)
        assert torch.cuda.current_device() == 0
    assert_fa_close(y, reference.layer_norm(x, w, b, 1e-5))


def test_decode_model_views():
    """q/k_new/v_new as the model passes them: [:, 0] slices of a [B, 1, 3, H, D] view."""
    B, H, D, T_max = 3, 4, 64, 40
    qkv = torch.randn(B, 1, 3, H, D, device=DEV, dtype=torch.float16)
    q, kn, vn = (t[:, 0] for t in qkv.unbind(2))
    kc = torch.randn(B, H, T_max, D, device=DEV, dtype=torch.float16)
    vc = torch.randn(B, H, T_max, D, device=DEV, dtype=torch.float16)
    _check_decode(q, kc, vc, torch.tensor([0, 17, 39], device=DEV, dtype=torch.int32), kn, vn)


def test_decode_cuda_graph_capture_and_replay():
    B, H, T_max, D = 2, 4, 512, 64
    dtype = torch.float16
    q, kc, vc, sl, kn, vn = _decode_case(B, H, T_max, D, dtype, [5, 300], True)
    kc0, vc0 = kc.clone(), vc.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph (also the first append)
        ops.decode_attention(q, kc, vc, sl, kn, vn, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.decode_attention(q, kc, vc, sl, kn, vn, backend="cuda")
    for step, lens in enumerate(([7, 301], [0, 511], [100, 200])):
        kc.copy_(kc0)
        vc.copy_(vc0)
        q.copy_(torch.randn_like(q))
        kn.copy_(torch.randn_like(kn))
        vn.copy_(torch.randn_like(vn))
        sl.copy_(torch.tensor(lens, device=DEV, dtype=torch.int32))
        g.replay()
        torch.cuda.synchronize()
        kcr, vcr = kc0.clone(), vc0.clone()
        base = reference.decode_attention(q, kcr, vcr, sl, kn, vn)
        ref32 = reference.decode_attention(q.float(), kc0.float(), vc0.float(), sl, kn.float(), vn.float())
        assert kc0.dtype != torch.float32  # .float() above copied, so kc0 is still the pre-append cache
        assert_fa_close(out, ref32, base, msg=f"replay {step}")
        assert torch.equal(kc, kcr) and torch.equal(vc, vcr)


def test_torch_compile_through_custom_ops():
    dtype = torch.float16

    def block(x, r, w, b, bias, q, k, v):
        y, h = ops.layer_norm(x, w, b, 1e-5, residual=r, backend="cuda")
        g = ops.bias_gelu(y, bias, backend="cuda")
        a = ops.attention(q, k, v, causal=True, backend="cuda")
        return g, h, a

    args = [torch.randn(4, 64, device=DEV, dtype=dtype) for _ in range(2)]
    args += [torch.randn(64, device=DEV, dtype=dtype) for _ in range(3)]
    args += [torch.randn(1, 2, 33, 64, device=DEV, dtype=dtype) for _ in range(3)]
    eager = block(*args)
    compiled = torch.compile(block)(*args)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


def test_backend_ops_trace_without_graph_breaks():
    """The backend's checks are metadata-only, so dynamo traces each op into one graph."""
    from gpt2fast.ops import cuda

    def block(x, r, w, b, q, kc, vc, sl, kn):
        y, h = cuda.layer_norm(x, w, b, 1e-5, r)
        g = cuda.bias_gelu(y, b)
        a = cuda.attention(q, q, q, True, None)
        d = cuda.decode_attention(q[:, :, 0], kc, vc, sl, kn, kn, None)
        return g, h, a, d

    dtype = torch.float16
    x, r = (torch.randn(4, 64, device=DEV, dtype=dtype) for _ in range(2))
    w, b = (torch.randn(64, device=DEV, dtype=dtype) for _ in range(2))
    q = torch.randn(2, 2, 9, 64, device=DEV, dtype=dtype)
    kc, vc = (torch.randn(2, 2, 32, 64, device=DEV, dtype=dtype) for _ in range(2))
    sl = torch.tensor([3, 30], device=DEV, dtype=torch.int32)
    kn = torch.randn(2, 2, 64, device=DEV, dtype=dtype)
    block(x, r, w, b, q, kc, vc, sl, kn)  # eager first: caches the runtime probe
    explained = torch._dynamo.explain(block)(x, r, w, b, q, kc, vc, sl, kn)
    assert explained.graph_break_count == 0, [br.reason for br in explained.break_reasons]


# ----------------------------------------------------------------------------- whole model
TINY = GPT2Config(vocab_size=301, n_positions=96, n_embd=128, n_layer=2, n_head=2)
_BASE: dict[str, GPT2] = {}


def _model(dtype, backend):
    """One fp32 model with every parameter random (biases and LayerNorm too), cast to ``dtype``."""
    if "m" not in _BASE:
        torch.manual_seed(0)
        m = GPT2(TINY).to(DEV).eval().requires_grad_(False)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        _BASE["m"] = m
    model = copy.deepcopy(_BASE["m"]).to(dtype)
    model.backend = backend
    return model


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_gpt2_logits(dtype):
    ids = torch.randint(0, TINY.vocab_size, (2, 37), device=DEV, generator=torch.Generator(DEV).manual_seed(1))
    with torch.no_grad():
        ref32 = _model(torch.float32, "reference")(ids)
        base = _model(dtype, "reference")(ids)
        out = _model(dtype, "cuda")(ids)
    assert_fa_close(out, ref32, base)


def test_tiny_gpt2_greedy_tokens():
    ids = torch.randint(0, TINY.vocab_size, (2, 11), device=DEV, generator=torch.Generator(DEV).manual_seed(2))
    ref = _model(torch.float32, "reference").generate(ids, max_new_tokens=16)
    out = _model(torch.float32, "cuda").generate(ids, max_new_tokens=16)
    assert torch.equal(out, ref), f"greedy tokens differ:\n{out}\n{ref}"


def test_tiny_gpt2_prefill_decode_vs_forward():
    """Prefill of ragged prompts + decode steps on the cuda backend match the full forward."""
    model = _model(torch.float32, "cuda")
    ids = torch.randint(0, TINY.vocab_size, (2, 20), device=DEV, generator=torch.Generator(DEV).manual_seed(3))
    lengths = torch.tensor([20, 13], device=DEV, dtype=torch.int32)
    model.setup_cache(2, 40)
    logits = model.prefill(ids, lengths)
    seqs = [ids[0].tolist(), ids[1, :13].tolist()]
    for _ in range(5):
        tok = logits.argmax(-1)
        for i in range(2):
            seqs[i].append(int(tok[i]))
        logits = model.decode_step(tok)
    ref = _model(torch.float32, "reference")
    with torch.no_grad():
        for i in range(2):
            full = ref(torch.tensor([seqs[i]], device=DEV))[0, -1]
            assert_fa_close(logits[i], full, msg=f"sequence {i}")
