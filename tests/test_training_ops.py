"""Training through the ops: which kernels a backward launches, that inference launches what it did before, the
backward ops chosen through the registry, and torch.compile (aot_eager) through forward and backward.

The gradients' values are checked for every differentiable (op, backend) pair by test_ops_conformance.py
(``test_gradients``); the custom ops' ``opcheck`` (autograd included) is in test_triton_internals.py.  On CPU the
Triton kernels run under the interpreter; the ``gpu`` tests (CUDA graphs) run only on a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from _backends import DEVICE

from gpt2fast import ops
from gpt2fast.ops import _autograd, _registry
from gpt2fast.ops.specs import bias_gelu_backward as gelu_backward
from gpt2fast.ops.specs import linear_cross_entropy as lce
from gpt2fast.testing import conformance as cf

TRITON = ops.backend_status("triton", DEVICE)
needs_triton = pytest.mark.skipif(not TRITON.available, reason=f"triton unavailable: {TRITON.reason}")
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
DEV = torch.device(DEVICE)
INTERPRETED = DEVICE == "cpu"


def _leaf(*shape, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape) * std).to(device=DEV, dtype=dtype).requires_grad_()


def _launches(fn):
    """Triton kernel launches (by name) inside ``fn`` under the interpreter; None on a GPU (not observable)."""
    if not INTERPRETED:
        fn()
        return None
    with cf.count_triton_launches() as counts:
        fn()
    return dict(counts)


# ---- which kernels run -----------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_backward_launches_the_triton_backward_kernels(residual):
    x, w, b = _leaf(5, 48), _leaf(48), _leaf(48)
    r = _leaf(5, 48) if residual else None
    out = ops.layer_norm(x, w, b, residual=r, backend="triton")
    outs = list(out) if residual else [out]
    got = _launches(
        lambda: torch.autograd.grad(
            outs, [t for t in (x, w, b, r) if t is not None], [torch.ones_like(o) for o in outs]
        )
    )
    if got is not None:
        assert got == {"_layer_norm_bwd_kernel": 1, "_column_sum_kernel": 2}


@needs_triton
def test_bias_gelu_and_attention_backward_launch_the_triton_backward_kernels():
    x, b = _leaf(3, 64, std=3.0), _leaf(64)
    y = ops.bias_gelu(x, b, backend="triton")
    got = _launches(lambda: torch.autograd.grad(y, (x, b), torch.ones_like(y)))
    if got is not None:
        assert got == {"_bias_gelu_bwd_kernel": 1, "_column_sum_kernel": 1}
    q, k, v = (_leaf(1, 2, 40, 32) for _ in range(3))
    o = ops.attention(q, k, v, backend="triton")
    got = _launches(lambda: torch.autograd.grad(o, (q, k, v), torch.ones_like(o)))
    if got is not None:
        assert got == {"_attn_bwd_delta_kernel": 1, "_attn_bwd_dkdv_kernel": 1, "_attn_bwd_dq_kernel": 1}


@needs_triton
def test_linear_cross_entropy_computes_its_gradients_in_the_forward_kernel():
    h, w = _leaf(40, 16), _leaf(300, 16)
    labels = torch.randint(0, 300, (40,), device=DEV)
    chunks = -(-40 // lce.chunk_rows(40, 300, 16))
    box = {}
    got = _launches(lambda: box.setdefault("loss", ops.linear_cross_entropy(h, w, labels, backend="triton")))
    if got is not None:
        assert got == {"_cross_entropy_chunk_kernel": chunks}
    got = _launches(lambda: box["loss"].backward())  # the backward only scales the saved gradients (torch)
    if got is not None:
        assert got == {}
    assert h.grad is not None and w.grad is not None


@needs_triton
def test_inference_runs_the_inference_kernels_and_saves_nothing(monkeypatch):
    """Without a gradient, attention launches the forward without its log-sum-exp output, and no op keeps its
    inputs for a backward (the outputs have no grad_fn)."""
    attn_mod = importlib.import_module("gpt2fast.ops.triton.attention")
    stored = []
    real = attn_mod.run
    monkeypatch.setattr(attn_mod, "run", lambda *a: stored.append(a[-1] is not None) or real(*a))
    q, k, v = (_leaf(1, 2, 9, 32) for _ in range(3))
    x, w, b = _leaf(4, 32), _leaf(32), _leaf(32)
    with torch.no_grad():
        outs = [ops.attention(q, k, v, backend="triton"), ops.layer_norm(x, w, b, backend="triton")]
        outs += [ops.bias_gelu(x, b, backend="triton"), *ops.layer_norm(x, w, b, residual=x, backend="triton")]
    assert stored == [False] and all(o.grad_fn is None for o in outs)
    o = ops.attention(q, k, v, backend="triton")
    assert stored == [False, True] and o.grad_fn is not None


# ---- the registry picks the backward ---------------------------------------------------------------------------
def test_backward_prefers_the_forwards_backend_and_falls_through_otherwise():
    h, gy, w = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    args = (gy, h, w, 1e-5, None)
    assert _autograd.backward_backend("layer_norm_backward", "reference", args, torch.device("cpu")) == "reference"
    # a backend that does not implement the backward op (a third party's, or cuda's attention): "auto"
    assert _autograd.backward_backend("attention_backward", "cuda", args, torch.device("cpu")) == ops.AUTO
    assert _autograd.backward_backend("layer_norm_backward", "no-such-backend", args, torch.device("cpu")) == ops.AUTO


def test_a_forward_whose_backend_lacks_the_backward_op_trains_on_another():
    """A third-party backend's differentiable forward whose backward op it does not implement: the backward runs
    on whatever "auto" picks (the reference on CPU), through the registry."""
    ops.register_backend("toyfwd", priority=-3, is_available=lambda device: None)

    @torch.library.custom_op("gpt2fast_test::toy_bias_gelu", mutates_args=())
    def op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return ops.bias_gelu(x, bias, backend="reference")

    op.register_fake(lambda x, bias: torch.empty_like(x))
    gelu_backward.register_autograd(op, "toyfwd")
    ops.register_impl("bias_gelu", "toyfwd", differentiable=True)(op)
    try:
        x, b = torch.randn(2, 8, requires_grad=True), torch.randn(8, requires_grad=True)
        with cf.count_dispatches() as counts:
            y = ops.bias_gelu(x, b, backend="toyfwd")
            gx, gb = torch.autograd.grad(y, (x, b), torch.ones_like(y))
        assert counts[("bias_gelu_backward", "reference")] == 1
        x2, b2 = x.detach().requires_grad_(), b.detach().requires_grad_()
        ref = torch.autograd.grad(ops.bias_gelu(x2, b2, backend="reference").sum(), (x2, b2))
        assert torch.allclose(gx, ref[0]) and torch.allclose(gb, ref[1])
    finally:
        ops.unregister_backend("toyfwd")


def test_decode_attention_refuses_a_gradient_before_any_backend():
    q = torch.randn(1, 2, 32, requires_grad=True)
    kc, vc = torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32)
    lengths = torch.tensor([2], dtype=torch.int32)
    with cf.count_dispatches() as counts, pytest.raises(RuntimeError, match="decode_attention is inference-only"):
        ops.decode_attention(q, kc, vc, lengths)
    assert not counts
    with torch.no_grad():
        assert ops.decode_attention(q, kc, vc, lengths).shape == (1, 2, 32)


def test_non_differentiable_backends_are_declined_when_a_gradient_is_needed():
    """cuda attention saves no log-sum-exp: registered without a backward, so a training call skips it."""
    impl = _registry._impls[("attention", "cuda")]
    assert not impl.differentiable
    q = torch.randn(1, 1, 4, 32, requires_grad=True)
    assert "has no backward for 'attention'" in impl.declines((q, q, q, True, None))
    for op in ("layer_norm", "bias_gelu", "linear_cross_entropy"):
        assert _registry._impls[(op, "cuda" if op != "linear_cross_entropy" else "triton")].differentiable


# ---- torch.compile ---------------------------------------------------------------------------------------------
@needs_triton
def test_torch_compile_traces_forward_and_backward_through_the_triton_ops():
    def block(x, r, w, b, q, k, v, head, labels):
        y, h = ops.layer_norm(x, w, b, residual=r, backend="triton")
        g = ops.bias_gelu(y, b, backend="triton")
        a = ops.attention(q, k, v, backend="triton")
        loss = ops.linear_cross_entropy(g + h, head, labels, backend="triton", check_labels=False)
        return loss + a.float().square().mean()

    def leaves():
        gen = torch.Generator().manual_seed(0)
        shapes = [(8, 32), (8, 32), (32,), (32,), (1, 2, 8, 32), (1, 2, 8, 32), (1, 2, 8, 32), (50, 32)]
        return [torch.randn(*s, generator=gen).to(DEV).requires_grad_() for s in shapes]

    labels = torch.tensor([1, 2, -100, 4, 5, 6, 7, 49], device=DEV)
    eager_in, comp_in = leaves(), leaves()
    block(*eager_in, labels).backward()
    torch._dynamo.reset()
    torch.compile(block, backend="aot_eager", fullgraph=True)(*comp_in, labels).backward()
    for a, c in zip(eager_in, comp_in, strict=True):
        assert torch.allclose(a.grad, c.grad, rtol=1e-5, atol=1e-6)


# ---- CUDA graphs (GPU only) ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_training_step_replays_in_a_cuda_graph(backend):
    """Forward + backward of layer_norm and bias_gelu (and triton attention) captured once and replayed: no host
    syncs, no allocation outside the graph's pool; the replayed gradients equal the eager ones.  Unverified: no GPU
    has run it yet."""
    if not ops.backend_status(backend, DEVICE).available:
        pytest.skip(f"{backend} unavailable")
    x, w, b = _leaf(64, 768, dtype=torch.float16), _leaf(768, dtype=torch.float16), _leaf(768, dtype=torch.float16)
    q = _leaf(2, 4, 128, 64, dtype=torch.float16)

    def step():
        y, h = ops.layer_norm(x, w, b, residual=x, backend=backend)
        g = ops.bias_gelu(y, b, backend=backend)
        a = ops.attention(q, q, q, backend="triton")
        return torch.autograd.grad(
            [g, h, a], [x, w, b, q], [torch.ones_like(g), torch.ones_like(h), torch.ones_like(a)]
        )

    eager = step()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm up (compile, autotune) outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for e, c in zip(eager, captured, strict=True):
        assert torch.equal(e, c)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "name",
    ["cuda_layer_norm", "cuda_layer_norm_residual", "cuda_bias_gelu", "cuda_layer_norm_backward",
     "cuda_bias_gelu_backward", "cuda_attention", "cuda_decode_attention"],
)  # fmt: skip
def test_gpu_opcheck_cuda_custom_ops(name):
    """torch.library.opcheck of every cuda custom op (schema, fake, autograd registration; forward and backward for
    the differentiable ones).  Unverified: no GPU has run it yet."""
    if not ops.backend_status("cuda", DEVICE).available:
        pytest.skip("cuda backend unavailable")
    grad = name in ("cuda_layer_norm", "cuda_layer_norm_residual", "cuda_bias_gelu")
    x, w, b = (_leaf(*s, dtype=torch.float16) for s in ((4, 64), (64,), (64,)))
    x, w, b = (t.detach().requires_grad_(grad) for t in (x, w, b))
    q, kc, vc = (torch.randn(*s, device=DEV, dtype=torch.float16) for s in ((2, 2, 64), (2, 2, 8, 64), (2, 2, 8, 64)))
    lengths = torch.tensor([2, 5], device=DEV, dtype=torch.int32)
    args = {
        "cuda_layer_norm": (x, w, b, 1e-5),
        "cuda_layer_norm_residual": (x, w, b, 1e-5, x.detach().clone().requires_grad_(grad)),
        "cuda_bias_gelu": (x, b),
        "cuda_layer_norm_backward": (x, x.clone(), w, 1e-5, x.clone()),
        "cuda_bias_gelu_backward": (x, x.clone(), b),
        "cuda_attention": (kc, kc.clone(), vc, True, 0.125),
        "cuda_decode_attention": (q, kc, vc, lengths, None, None, 0.125),
    }[name]
    torch.library.opcheck(getattr(torch.ops.gpt2fast, name).default, args)
