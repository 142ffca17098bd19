"""GPU tests of the CUDA backend's internals (its parity on every op's test and GPU shapes is
``tests/test_ops_conformance.py``, which runs every registered backend):

* LayerNorm numerics the kernel is built for (|mean| >> std) with row-strided and misaligned (scalar path) rows;
* the decode append on split boundaries next to empty splits;
* a launch on a non-current device runs there and leaves the current device alone (two GPUs);
* CUDA-graph capture and replay of decode attention;
* torch.compile through the custom ops, without graph breaks;
* a tiny GPT-2 on the cuda backend: logits, greedy tokens, prefill + decode against the reference.

All tests need a CUDA device and the built extension; a GPU machine without the extension fails (it does not
skip), so a broken build cannot pass silently.
"""

from __future__ import annotations

import pytest
import torch
from test_cuda_internals import ops_block, ops_block_args

from gpt2fast import GPT2, ops
from gpt2fast.config import GPT2Config
from gpt2fast.ops import reference
from gpt2fast.ops.cuda import _ext, decode_attention
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


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_large_mean_and_row_stride(dtype):
    """|mean| >> std (variance cancellation) and rows with a stride wider than N; the residual is an offset view
    (scalar loads)."""
    big = torch.randn(6, 2000, device=DEV, dtype=dtype) * 0.1 + 30
    x = big[:, :1600]
    r = torch.randn(6, 2000, device=DEV, dtype=dtype)[:, 8:1608]
    w = torch.rand(1600, device=DEV, dtype=dtype) + 0.5
    b = torch.randn(1600, device=DEV, dtype=dtype)
    y, h = ops.layer_norm(x, w, b, 1e-5, residual=r, backend="cuda")
    y32, h32 = reference.layer_norm(*_f32(x, w, b), 1e-5, r.float())
    yb, hb = reference.layer_norm(x, w, b, 1e-5, r)
    assert_fa_close(y, y32, yb)
    assert_fa_close(h, h32, hb)
    y = ops.layer_norm(x, w, b, 1e-5, backend="cuda")
    assert_fa_close(y, reference.layer_norm(*_f32(x, w, b), 1e-5), reference.layer_norm(x, w, b, 1e-5))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_append_on_split_boundaries(dtype):
    """The append slot at the first and last position of a split, next to empty splits (lse = -inf)."""
    b, h, t_max = 5, 1, 4096
    splits = decode_attention.choose_splits(b * h, t_max, _ext.num_sms(torch.cuda.current_device()))
    chunk = -(-t_max // splits)
    assert splits > 2, "this case needs several splits"
    seqlens = [chunk - 1, chunk, 2 * chunk - 1, 0, t_max - 1]
    _check_decode(*_decode_case(b, h, t_max, 64, dtype, seqlens, True))
    _check_decode(*_decode_case(b, h, t_max, 64, dtype, [chunk, chunk + 1, 2 * chunk, 0, t_max], False))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launch_on_non_current_device():
    """Tensors on cuda:1 while cuda:0 is current: every op runs on cuda:1 (the device guard) and cuda:0 stays
    current, through the public ops and through a custom op called directly (as compiled code does)."""
    from gpt2fast.ops.cuda import layer_norm

    dev = torch.device("cuda:1")
    x = torch.randn(3, 64, device=dev)
    w, b = torch.rand(64, device=dev) + 0.5, torch.randn(64, device=dev)
    q, kc, vc, sl, kn, vn = (t.to(dev) for t in _decode_case(2, 2, 64, 64, torch.float16, [3, 60], True))
    qa = torch.randn(1, 2, 33, 64, device=dev, dtype=torch.float16)
    with torch.cuda.device(0):
        y = layer_norm.layer_norm_op(x, w, b, 1e-5)
        assert torch.cuda.current_device() == 0
        assert_fa_close(y, reference.layer_norm(x, w, b, 1e-5))
        assert_fa_close(ops.bias_gelu(x, b, backend="cuda"), reference.bias_gelu(x, b))
        a = ops.attention(qa, qa, qa, backend="cuda")
        assert_fa_close(a, reference.attention(qa.float(), qa.float(), qa.float()), reference.attention(qa, qa, qa))
        assert torch.cuda.current_device() == 0
        _check_decode(q, kc, vc, sl, kn, vn)
        assert torch.cuda.current_device() == 0


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


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_through_custom_ops():
    """Compiled (inductor) and eager give bit-identical results, caches included."""
    args = ops_block_args(DEV)
    eager_args = [t.clone() for t in args]
    eager = ops_block(*eager_args)
    torch._dynamo.reset()
    compiled = torch.compile(ops_block, fullgraph=True)(*args)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    torch.testing.assert_close(args[5], eager_args[5], rtol=0, atol=0)  # the appended k_cache


def test_ops_trace_without_graph_breaks():
    """The backend's checks are metadata-only, so dynamo traces each op into one graph."""
    args = ops_block_args(DEV)
    ops_block(*args)  # eager first: caches the runtime probe
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ops_block)(*args)
    assert explained.graph_break_count == 0, [br.reason for br in explained.break_reasons]


# ----------------------------------------------------------------------------- whole model
TINY = GPT2Config(vocab_size=301, n_positions=96, n_embd=128, n_layer=2, n_head=2)
_BASE: dict[str, dict] = {}


def _model(dtype, backend):
    """The same fp32 weights (every parameter random, biases and LayerNorm too), cast to ``dtype``, on ``backend``."""
    if "state" not in _BASE:
        torch.manual_seed(0)
        m = GPT2(TINY).to(DEV).eval().requires_grad_(False)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        _BASE["state"] = m.state_dict()
    model = GPT2(TINY, backend=backend).to(DEV).eval().requires_grad_(False)
    model.load_state_dict(_BASE["state"])
    return model.to(dtype)


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
