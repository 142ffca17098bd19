"""The op registry: backends, implementations, per-op and per-input fall-through under "auto", named-backend
errors, memoised resolution, process defaults, and an op added at run time (a spec plus a reference only)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from _backends import auto_backend

from gpt2fast import GPT2, GPT2Config, ops
from gpt2fast.ops import _registry
from gpt2fast.ops._spec import BadInput, EdgeInput, OpSpec, Traffic, seeded_randn
from gpt2fast.testing import conformance as cf

TOY = "toy"


@pytest.fixture
def clean(monkeypatch):
    """No process default backend; a test's toy backends and ops are removed afterwards."""
    monkeypatch.delenv("GPT2FAST_BACKEND", raising=False)
    ops.set_backend(None)
    yield monkeypatch
    ops.set_backend(None)
    for name in ("toy", "toy64", "broken"):
        if name in ops.backend_names():
            ops.unregister_backend(name)
    for spec in ops.specs():
        if spec.name.startswith("toy_"):
            ops.unregister_op(spec.name)


def toy_backend(calls: Counter, name: str = TOY, priority: int = 100, availability_calls: Counter | None = None):
    """A backend above every built-in one that implements only ``layer_norm`` (correctly), counting calls."""

    def is_available(device):
        if availability_calls is not None:
            availability_calls[device.type] += 1
        return None

    ops.register_backend(name, priority=priority, is_available=is_available)

    @ops.register_impl("layer_norm", name)
    def layer_norm(x, weight, bias, eps, residual):
        calls["layer_norm"] += 1
        h = x if residual is None else x + residual
        y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
        return y if residual is None else (y, h)


def rn(*shape: int) -> torch.Tensor:
    """Random normal CPU tensor."""
    return torch.randn(*shape)


# ---- the toy backend of the "Done when" ------------------------------------------------------------------------
def test_auto_reaches_a_higher_backend_for_its_op_and_falls_through_for_the_others(clean):
    calls = Counter()
    toy_backend(calls)
    x, w, b = rn(3, 32), rn(32), rn(32)
    with cf.count_dispatches() as went:
        y = ops.layer_norm(x, w, b)
        ops.bias_gelu(x, b)
        q = rn(1, 2, 5, 32)
        ops.attention(q, q, q)
        ops.decode_attention(rn(2, 2, 32), rn(2, 2, 8, 32), rn(2, 2, 8, 32), torch.tensor([3, 5], dtype=torch.int32))
    assert went == {("layer_norm", TOY): 1, **{(op, auto_backend(op, skip=TOY)): 1 for op in ("bias_gelu", "attention",
                    "decode_attention")}}  # fmt: skip
    assert calls["layer_norm"] == 1
    torch.testing.assert_close(y, F.layer_norm(x, (32,), w, b))


def test_a_named_backend_lacking_the_op_names_both(clean):
    toy_backend(Counter())
    with pytest.raises(ops.BackendUnavailableError, match=r"backend 'toy' does not implement op 'bias_gelu'"):
        ops.bias_gelu(rn(3, 32), rn(32), backend=TOY)


def test_bad_input_never_reaches_a_registered_backend(clean):
    calls = Counter()
    toy_backend(calls)
    for backend in (TOY, "auto", None):
        with cf.count_dispatches() as went, pytest.raises(ValueError, match=r"weight must have shape \[32\]"):
            ops.layer_norm(rn(3, 32), rn(31), rn(32), backend=backend)
        assert not went
    assert calls["layer_norm"] == 0


def test_a_gpt2_model_on_auto_runs_with_the_toy_backend(clean):
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = GPT2.random(config, seed=0, backend="reference")
    ids = torch.randint(0, 64, (2, 7))
    expected = model(ids)
    calls = Counter()
    toy_backend(calls)
    model.backend = "auto"
    torch.testing.assert_close(model(ids), expected)
    assert calls["layer_norm"] == 2 * config.n_layer + 1  # ln_1, ln_2 per block and ln_f
    out = model.generate(ids, max_new_tokens=3)
    assert out.shape == (2, 10)


# ---- per-input fall-through --------------------------------------------------------------------------------------
def toy64(calls: Counter) -> None:
    """A backend whose attention supports only head dim 64."""
    ops.register_backend("toy64", priority=100, is_available=lambda device: None)

    def supports(q, k, v, causal, scale):
        return None if q.shape[-1] == 64 else f"toy64 attention supports head dim 64 only; got D={q.shape[-1]}"

    @ops.register_impl("attention", "toy64", supports=supports)
    def attention(q, k, v, causal, scale):
        calls["attention"] += 1
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def test_auto_falls_through_an_input_the_top_backend_declares_unsupported(clean):
    calls = Counter()
    toy64(calls)
    q64, q8 = rn(1, 2, 9, 64), rn(1, 2, 9, 8)
    with cf.count_dispatches() as went:
        out64 = ops.attention(q64, q64, q64)
        out8 = ops.attention(q8, q8, q8)
    assert went == {("attention", "toy64"): 1, ("attention", auto_backend("attention", skip=TOY)): 1}
    torch.testing.assert_close(out8, F.scaled_dot_product_attention(q8, q8, q8, is_causal=True))
    torch.testing.assert_close(out64, F.scaled_dot_product_attention(q64, q64, q64, is_causal=True))
    with pytest.raises(ops.UnsupportedInputError, match=r"toy64 attention supports head dim 64 only; got D=8"):
        ops.attention(q8, q8, q8, backend="toy64")
    assert (
        ops.supported("attention", "toy64", q8, q8, q8, True, None)
        == "toy64 attention supports head dim 64 only; got D=8"
    )
    meta = torch.empty(1, 2, 3, 64, device="meta")
    assert ops.supported("attention", "toy64", meta, meta, meta, True, None) is None
    assert ops.supported("attention", "auto", q8, q8, q8, True, None) is None


def test_a_head_dim_the_kernels_lack_falls_through_to_reference_under_auto():
    """The built-in case of the same rule: triton declines head dim 8; on CPU auto never picks triton anyway,
    so check the verdicts the fall-through uses."""
    q = torch.empty(1, 2, 3, 8, device="meta")
    for backend in ("triton", "cuda"):
        reason = ops.supported("attention", backend, q, q, q, True, None)
        if reason is not None and "unavailable" not in reason and "not importable" not in reason:
            assert "D=8" in reason or "D = 8" in reason
    assert ops.supported("attention", "reference", q, q, q, True, None) is None


# ---- the registry API --------------------------------------------------------------------------------------------
def test_implementations_lists_every_pair_with_priority_and_reason(clean):
    toy_backend(Counter())
    rows = ops.implementations("cpu")
    assert ("layer_norm", TOY, 100, None) in rows
    assert {r.op for r in rows} >= {"layer_norm", "bias_gelu", "attention", "decode_attention"}
    assert all(("reference" in {r.backend for r in rows if r.op == op}) for op in {r.op for r in rows})
    ln = [r.backend for r in rows if r.op == "layer_norm"]
    assert ln[0] == TOY and ln[-1] == "reference"  # by priority
    cuda = [r for r in rows if r.backend == "cuda"]
    assert cuda and all(isinstance(r.reason, str) and r.reason for r in cuda)  # no GPU here: a reason, not None


def test_unregister_backend_removes_it_and_its_implementations(clean):
    toy_backend(Counter())
    ops.unregister_backend(TOY)
    assert TOY not in ops.backend_names()
    assert all(r.backend != TOY for r in ops.implementations("cpu"))
    with pytest.raises(ValueError, match="unknown backend 'toy'"):
        ops.layer_norm(rn(2, 8), rn(8), rn(8), backend=TOY)
    with pytest.raises(ValueError, match="reference backend implements every op"):
        ops.unregister_backend("reference")


def test_register_impl_checks_the_op_the_backend_and_the_arity(clean):
    with pytest.raises(ValueError, match=r"register_backend\('nope'"):
        ops.register_impl("layer_norm", "nope")
    ops.register_backend(TOY, priority=1, is_available=lambda d: None)
    with pytest.raises(ValueError, match="unknown op 'no_such_op'"):
        ops.register_impl("no_such_op", TOY)
    with pytest.raises(TypeError, match=r"takes 2 positional arguments; the op's are \('x', 'weight'"):
        ops.register_impl("layer_norm", TOY)(lambda x, weight: x)
    with pytest.raises(TypeError, match="priority must be an int"):
        ops.register_backend("broken", priority="high", is_available=lambda d: None)
    with pytest.raises(ValueError, match="backend name"):
        ops.register_backend("auto", priority=1, is_available=lambda d: None)


def test_a_broken_availability_check_is_reported_not_raised(clean):
    def is_available(device):
        raise RuntimeError("driver exploded")

    ops.register_backend("broken", priority=200, is_available=is_available)
    ops.register_impl("bias_gelu", "broken")(lambda x, bias: x)
    status = ops.backend_status("broken", "cpu")
    assert not status.available and "driver exploded" in status.reason
    x, b = rn(2, 4), rn(4)
    torch.testing.assert_close(ops.bias_gelu(x, b), F.gelu(x + b, approximate="tanh"))  # auto skips it
    with pytest.raises(ops.BackendUnavailableError, match=r"'broken' is unavailable for cpu tensors: .*exploded"):
        ops.bias_gelu(x, b, backend="broken")


def test_resolution_is_memoised_per_op_backend_and_device(clean):
    availability = Counter()
    toy_backend(Counter(), availability_calls=availability)
    x, w, b = rn(2, 8), rn(8), rn(8)
    for _ in range(5):
        ops.layer_norm(x, w, b)
        ops.layer_norm(x, w, b, backend=TOY)
    assert availability["cpu"] == 1
    assert ("layer_norm", "auto", torch.device("cpu")) in _registry._memo


# ---- backend selection (moved from the old reference-op tests) ----------------------------------------------------
def test_available_backends_lists_every_backend_with_a_reason(clean):
    statuses = ops.available_backends("cpu")
    assert [s.name for s in statuses] == ops.backend_names()
    assert {"cuda", "triton", "reference"} <= set(ops.backend_names())
    assert all(isinstance(s.reason, str) and s.reason for s in statuses)
    assert {s.name: s.available for s in statuses}["reference"] is True
    assert not ops.backend_status("cuda", "cpu").available


def test_unknown_backend_is_rejected(clean):
    x, b = rn(2, 4), rn(4)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        ops.bias_gelu(x, b, backend="nope")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("nope")
    assert ops.get_backend() == "auto"


def test_unavailable_backend_says_why(clean):
    with pytest.raises(ops.BackendUnavailableError, match="'cuda' is unavailable for cpu tensors"):
        ops.bias_gelu(rn(2, 4), rn(4), backend="cuda")


def test_set_backend_and_env_var(clean):
    x, b = rn(2, 4), rn(4)
    expected = F.gelu(x + b, approximate="tanh")
    clean.setenv("GPT2FAST_BACKEND", "reference")
    assert ops.get_backend() == "reference"
    assert torch.allclose(ops.bias_gelu(x, b), expected, atol=1e-6)
    clean.setenv("GPT2FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        ops.bias_gelu(x, b)
    ops.set_backend("reference")  # overrides the env var
    assert ops.get_backend() == "reference"
    assert torch.allclose(ops.bias_gelu(x, b), expected, atol=1e-6)
    ops.set_backend(None)
    assert ops.get_backend() == "bogus"
    clean.delenv("GPT2FAST_BACKEND")
    assert ops.get_backend() == "auto"
    assert torch.allclose(ops.bias_gelu(x, b), expected, atol=1e-6)  # auto on CPU = reference


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_torch_compile_fullgraph_through_public_ops_after_first_use(clean, backend):
    """After one eager call resolves the backend, the public ops trace with fullgraph=True and agree."""
    x, w, b = torch.randn(4, 8), torch.rand(8) + 0.5, torch.randn(8)
    q = torch.randn(1, 2, 5, 32)

    def f(x, w, b, q):
        y, h = ops.layer_norm(x, w, b, residual=x, backend=backend)
        return y, h, ops.bias_gelu(x, b, backend=backend), ops.attention(q, q, q, backend=backend)

    eager = f(x, w, b, q)
    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b, q)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(c, a)


# ---- an op added at run time: a spec plus a reference, nothing else ----------------------------------------------
def toy_scale_shift(x: torch.Tensor, alpha: float = 2.0, backend: str | None = None) -> torch.Tensor:
    """x * alpha + 1 (a toy op for the registry tests)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
    if not (isinstance(alpha, float) and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    return _registry.dispatch("toy_scale_shift", backend, (x, alpha), x.device)


BAD_TOY = BadInput(
    "toy-nan", "alpha nan", lambda: dict(x=torch.ones(2), alpha=math.nan), ValueError, r"alpha must be a finite float"
)
EDGE_TOY = EdgeInput("toy-strided", "x[:, ::2]", lambda d: dict(x=torch.ones(3, 8, device=d)[:, ::2], alpha=3.0))


BAD_TOY = BadInput(
    "toy-nan", "alpha nan", lambda: dict(x=torch.ones(2), alpha=math.nan), ValueError, r"alpha must be a finite float"
)
EDGE_TOY = EdgeInput("toy-strided", "x[:, ::2]", lambda d: dict(x=torch.ones(3, 8, device=d)[:, ::2], alpha=3.0))


def toy_spec(reference=lambda x, alpha: x * alpha + 1) -> OpSpec:
    """The spec of :func:`toy_scale_shift`, with the given reference."""

    def make_inputs(shape, dtype, device, gen):
        return dict(x=seeded_randn(gen, device, dtype)(shape["rows"], shape["n"]), alpha=shape.get("alpha", 2.0))

    return OpSpec(
        name="toy_scale_shift",
        op=toy_scale_shift,
        args=("x", "alpha"),
        reference=reference,
        make_inputs=make_inputs,
        test_shapes=(dict(rows=3, n=5), dict(rows=1, n=1, alpha=-0.5)),
        gpu_shapes=(dict(rows=1024, n=1024),),
        bad_inputs=(BAD_TOY,),
        edge_inputs=(EDGE_TOY,),
        shape_strategy=lambda size: None,
        bench_cases=lambda sweep: [],
        traffic=lambda shape, dtype: Traffic(2 * shape["rows"] * shape["n"] * 4),
    )


def test_a_toy_op_is_public_implemented_by_reference_and_passes_the_conformance_checks(clean):
    ops.register_op(toy_spec())
    assert ops.toy_scale_shift(torch.ones(2), 3.0).tolist() == [4.0, 4.0]
    assert ("toy_scale_shift", "reference", 0, None) in ops.implementations("cpu")
    from gpt2fast.ops import reference

    assert reference.toy_scale_shift(torch.zeros(1), 1.0).item() == 1.0
    assert cf.check_backend("reference", "cpu") > 0  # every check, for every op incl. the toy one
    ops.unregister_op("toy_scale_shift")
    assert not hasattr(ops, "toy_scale_shift")


def test_the_conformance_checks_fail_a_wrong_implementation(clean):
    ops.register_op(toy_spec())
    ops.register_backend(TOY, priority=100, is_available=lambda d: None)
    ops.register_impl("toy_scale_shift", TOY)(lambda x, alpha: x * alpha)  # forgets the + 1
    spec = ops.get_spec("toy_scale_shift")
    inputs = spec.make_inputs(spec.test_shapes[0], torch.float32, torch.device("cpu"), torch.Generator())
    with pytest.raises(AssertionError, match="FAIL"):
        cf.check_parity(spec, TOY, inputs)
    with pytest.raises(AssertionError, match="FAIL"):
        cf.check_parity(spec, "auto", inputs)  # auto picks the higher-priority toy backend


def test_a_call_needing_gradients_runs_only_differentiable_implementations(clean):
    calls = Counter()
    toy_backend(calls)  # registered without differentiable=True
    x = rn(3, 32).requires_grad_()
    w, b = rn(32), rn(32)
    with cf.count_dispatches() as went:
        y = ops.layer_norm(x, w, b)  # auto: skips the toy backend for the next one that differentiates
    assert went == {("layer_norm", auto_backend("layer_norm", grad=True, skip=TOY)): 1} and calls["layer_norm"] == 0
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with pytest.raises(ops.UnsupportedInputError, match=r"backend 'toy' has no backward for 'layer_norm'"):
        ops.layer_norm(x, w, b, backend=TOY)
    with torch.no_grad():
        ops.layer_norm(x, w, b)
    assert calls["layer_norm"] == 1  # no gradient needed: the toy backend runs again
