"""The checks every (op, backend) pair must pass, driven by the op's spec alone.

``tests/test_ops_conformance.py`` runs them for every registered pair, so a newly registered backend (or op)
is tested without writing a test; a third-party backend can also call :func:`check_backend` directly.

* :func:`check_parity`: the backend against the reference in fp32 under the FlashAttention rule, with the
  reference in the input dtype as the baseline; the arguments an op writes (a KV cache) must match the
  reference's writes, every other input must be left untouched, and the spec's invariants must hold.
* the same under other memory layouts of the same values (:func:`views`: generic transposed and row-padded
  storage, plus the spec's own views); a backend may decline a layout through ``supports`` (then a named call
  raises that reason and "auto" falls through).
* :func:`check_gradients`: for a backend that registers a backward, the gradients of a seeded random upstream
  gradient (every argument in the spec's ``grad_args``) against the reference's autograd gradients, under the same
  rule (the reference one precision up as the oracle, the reference in the input dtype as the baseline).
* :func:`check_determinism`: two runs are bit-identical.
* :func:`check_bad_input`: the shared validation refuses it with the spec's message and no implementation is
  ever called (:func:`count_dispatches`).
* :func:`check_edge_input`: the backend either declines a valid-but-unusual input before any launch, or
  matches the reference on it; "auto" always matches the reference.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from gpt2fast.ops import _registry
from gpt2fast.ops._spec import BadInput, EdgeInput, Inputs, OpSpec, View, as_list, shape_id
from gpt2fast.testing import assert_all_fa_close, clone_inputs, upcast

#: Seed of the values of every conformance case.
SEED = 0


# ---- launch accounting ---------------------------------------------------------------------------------------
@contextmanager
def count_dispatches() -> Iterator[Counter]:
    """Count the calls that reach each registered implementation, by ``(op, backend)``, inside the block."""
    counts: Counter = Counter()
    _registry.backend_names()  # import the built-in backends first, so that restoring keeps their implementations
    saved = dict(_registry._impls)

    def counting(key, fn):
        def wrapper(*args):
            counts[key] += 1
            return fn(*args)

        return wrapper

    for key, impl in saved.items():
        _registry._impls[key] = dataclasses.replace(impl, fn=counting(key, impl.fn))
    _registry._memo.clear()
    try:
        yield counts
    finally:
        _registry._impls.clear()
        _registry._impls.update(saved)
        _registry._memo.clear()


@contextmanager
def count_triton_launches() -> Iterator[Counter]:
    """Count Triton kernel launches by kernel name inside the block (under Triton's interpreter only)."""
    from triton.runtime.interpreter import InterpretedFunction

    counts: Counter = Counter()
    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        counts[getattr(self.fn, "__name__", str(self.fn))] += 1
        return real(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield counts
    finally:
        InterpretedFunction.run = real


# ---- layouts -------------------------------------------------------------------------------------------------
def _restride(inputs: Inputs, make) -> Inputs:
    out = dict(inputs)
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2:
            out[name] = make(t)
    return out


def _transposed_storage(t: torch.Tensor) -> torch.Tensor:
    """The same values stored with the dims in reverse order (no unit last-dim stride)."""
    rev = list(range(t.dim()))[::-1]
    return t.permute(rev).contiguous().permute(rev)


def _padded_rows(t: torch.Tensor) -> torch.Tensor:
    """The same values inside a buffer whose last dim is padded by 16 elements (rows not adjacent)."""
    big = torch.zeros(*t.shape[:-1], t.shape[-1] + 16, dtype=t.dtype, device=t.device)
    big[..., : t.shape[-1]] = t
    return big[..., : t.shape[-1]]


GENERIC_VIEWS = (
    View("transposed-storage", lambda inp: _restride(inp, _transposed_storage)),
    View("padded-rows", lambda inp: _restride(inp, _padded_rows)),
)


def views(spec: OpSpec) -> tuple[View, ...]:
    """The layouts the stride tests try for ``spec``: the generic ones, then the spec's own."""
    return GENERIC_VIEWS + spec.views


# ---- parity --------------------------------------------------------------------------------------------------
def _tensors(inputs: Inputs) -> dict[str, torch.Tensor]:
    return {k: t for k, t in inputs.items() if isinstance(t, torch.Tensor)}


def run_backend(spec: OpSpec, backend: str | None, inputs: Inputs, view: View | None = None):
    """Run the op on fresh copies of ``inputs`` (laid out by ``view``); returns ``(outputs, inputs after)``."""
    ins = clone_inputs(inputs)
    if view is not None:
        ins = view.apply(ins)
    return as_list(spec.call(ins, backend)), ins


def check_parity(
    spec: OpSpec,
    backend: str | None,
    inputs: Inputs,
    view: View | None = None,
    shape: dict | None = None,
    msg: str = "",
) -> None:
    """The backend's outputs and in-place writes on ``inputs`` against the reference (FlashAttention rule)."""
    msg = f"{spec.name} on {backend} {shape_id(shape or {})} view={view.id if view else None} {msg}".strip()
    ref_in, base_in = upcast(clone_inputs(inputs)), clone_inputs(inputs)
    ref32, base = spec.run_reference(ref_in), spec.run_reference(base_in)
    out, ins = run_backend(spec, backend, inputs, view)
    assert_all_fa_close(out, ref32, base, msg=msg)
    for name, t in _tensors(ins).items():
        if name in spec.mutates:
            assert_all_fa_close(t, ref_in[name], base_in[name], msg=f"{msg}: {name} as written")
        elif not torch.equal(t, inputs[name]):
            raise AssertionError(f"{msg}: the op modified its input {name}")
    if spec.invariants is not None:
        spec.invariants(shape or {}, ins, out)


def check_determinism(spec: OpSpec, backend: str | None, inputs: Inputs, runs: int = 2) -> None:
    """``runs`` calls on copies of the same inputs give bit-identical outputs and writes."""

    def bits(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.contiguous().reshape(-1).view(torch.uint8) for t in ts]  # 0-D outputs (a loss) too

    def once() -> list[torch.Tensor]:
        out, ins = run_backend(spec, backend, inputs)
        return bits(out + [ins[name] for name in spec.mutates])

    first = once()
    for i in range(1, runs):
        again = once()
        for j, (a, b) in enumerate(zip(first, again, strict=True)):
            if not torch.equal(a, b):
                raise AssertionError(f"{spec.name} on {backend}: run {i} differs from run 0 in output {j}")


# ---- gradients -----------------------------------------------------------------------------------------------
def differentiable(spec: OpSpec, backend: str) -> bool:
    """Whether ``backend`` registers a backward for ``spec``'s op (and the op has arguments that take gradients)."""
    impl = _registry._impls.get((spec.name, backend))
    return bool(spec.grad_args) and impl is not None and impl.differentiable


def upstream_grads(outputs: list[torch.Tensor], seed: int = SEED) -> list[torch.Tensor]:
    """Seeded N(0, 1) upstream gradients, one per floating output, drawn in fp32 on the CPU (the same values for
    every backend and dtype; cast to each output's dtype by the caller)."""
    gen = torch.Generator().manual_seed(seed + 1)
    return [torch.randn(o.shape, generator=gen) for o in outputs if o.is_floating_point()]


def gradients(spec: OpSpec, backend: str | None, inputs: Inputs, grads_out: list[torch.Tensor]) -> dict:
    """The gradients of ``spec``'s op on ``backend`` (None: the reference implementation itself, called directly so
    that it runs in any dtype, the fp64 oracle's too) with respect to every present ``grad_args`` input, for the
    upstream gradients ``grads_out``: name -> tensor (zeros where none flows)."""
    ins = clone_inputs(inputs)
    leaves = {n: ins[n].detach().requires_grad_(True) for n in spec.grad_args if isinstance(ins.get(n), torch.Tensor)}
    ins.update(leaves)
    with torch.enable_grad():
        raw = spec.run_reference(ins) if backend is None else as_list(spec.call(ins, backend))
        outs = [o for o in raw if o.is_floating_point()]
        gouts = [g.to(device=o.device, dtype=o.dtype) for g, o in zip(grads_out, outs, strict=True)]
        got = torch.autograd.grad(outs, list(leaves.values()), gouts, allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), got)}


def check_gradients(spec: OpSpec, backend: str, inputs: Inputs, shape: dict | None = None, msg: str = "") -> None:
    """The backend's gradients of a seeded random upstream gradient against the reference's autograd gradients,
    each under the FlashAttention rule: the reference in fp32 is the oracle, the reference in the input dtype the
    baseline."""
    msg = f"{spec.name} on {backend} {shape_id(shape or {})} gradients {msg}".strip()
    outs = as_list(spec.run_reference(clone_inputs(inputs)))
    grads_out = upstream_grads([o for o in outs if o.is_floating_point()])
    ref32 = gradients(spec, None, upcast(inputs), grads_out)
    base = gradients(spec, None, inputs, grads_out)
    got = gradients(spec, backend, inputs, grads_out)
    for name in got:
        assert_all_fa_close(got[name], ref32[name], base[name], msg=f"{msg}: d{name}")


# ---- bad and edge inputs -------------------------------------------------------------------------------------
def check_bad_input(spec: OpSpec, bad: BadInput, backend: str | None) -> None:
    """``bad`` is refused with the spec's exception and message before any implementation is called."""
    with count_dispatches() as counts:
        try:
            spec.call(bad.make(), backend)
        except bad.exc as exc:
            if not re.search(bad.match, str(exc)):
                raise AssertionError(f"{bad.id} on {backend}: message {exc!s} does not match {bad.match!r}") from None
        else:
            raise AssertionError(f"{bad.id} on {backend}: no {bad.exc.__name__} raised")
    if counts:
        raise AssertionError(f"{bad.id} on {backend}: the input reached {dict(counts)} past the shared validation")


def edge_verdict(spec: OpSpec, edge: EdgeInput, backend: str) -> str | None:
    """Why ``backend`` declines ``edge`` (its ``supports`` reason), or None when it runs it (CPU tensors)."""
    inputs = edge.make(torch.device("cpu"))
    return _registry.supported(spec.name, backend, *(inputs[a] for a in spec.args))


def check_declines_or_matches(spec: OpSpec, backend: str, inputs: Inputs, msg: str = "") -> str | None:
    """``backend`` either declines ``inputs`` (laid out as given) through ``supports`` -- then a named call
    raises that reason before any implementation runs -- or matches the reference on them; "auto" matches the
    reference either way.  Returns the reason, or None when the backend ran them."""
    reason = _registry.supported(spec.name, backend, *(inputs[a] for a in spec.args))
    if reason is None:
        check_parity(spec, backend, inputs, msg=msg)
    else:
        with count_dispatches() as counts:
            try:
                spec.call(clone_inputs(inputs), backend)
            except _registry.UnsupportedInputError as exc:
                if str(exc) != reason:
                    raise AssertionError(f"{msg} on {backend}: raised {exc!r}, its supports said {reason!r}") from None
            else:
                raise AssertionError(f"{msg} on {backend}: declined ({reason}) but a named call ran")
        if counts:
            raise AssertionError(f"{msg} on {backend}: declined, yet {dict(counts)} ran")
    check_parity(spec, _registry.AUTO, inputs, msg=f"{msg} (auto)")
    return reason


def check_edge_input(spec: OpSpec, edge: EdgeInput, backend: str, device: torch.device) -> str | None:
    """:func:`check_declines_or_matches` on ``edge`` made on ``device``."""
    return check_declines_or_matches(spec, backend, edge.make(device), msg=edge.id)


def check_view(spec: OpSpec, backend: str, inputs: Inputs, view: View) -> str | None:
    """:func:`check_declines_or_matches` on ``inputs`` laid out by ``view``."""
    return check_declines_or_matches(spec, backend, view.apply(clone_inputs(inputs)), msg=f"view {view.id}")


# ---- everything, for one backend -------------------------------------------------------------------------------
def check_backend(backend: str, device: torch.device | str | None = None, dtypes=None) -> int:
    """Run every conformance check for every op ``backend`` implements on ``device``; returns the number of
    checks run (raises ``AssertionError`` on the first failure)."""
    device = _registry._device(device)
    status = _registry.backend_status(backend, device)
    if not status.available:
        raise RuntimeError(f"backend {backend!r} is unavailable on {device}: {status.reason}")
    n = 0
    for spec in _registry.specs():
        if (spec.name, backend) not in _registry._impls:
            continue
        for dtype in dtypes or spec.dtypes:
            for shape in spec.test_shapes:
                inputs = spec.make_inputs(shape, dtype, device, torch.Generator().manual_seed(SEED))
                check_parity(spec, backend, inputs, shape=shape)
                n += 1
        if differentiable(spec, backend):
            for dtype in dtypes or spec.dtypes:
                for shape in spec.test_shapes:
                    inputs = spec.make_inputs(shape, dtype, device, torch.Generator().manual_seed(SEED))
                    check_gradients(spec, backend, inputs, shape=shape)
                    n += 1
        inputs = spec.make_inputs(spec.test_shapes[0], torch.float32, device, torch.Generator().manual_seed(SEED))
        for view in views(spec):
            check_view(spec, backend, inputs, view)
            n += 1
        check_determinism(spec, backend, inputs)
        for bad in spec.bad_inputs:
            check_bad_input(spec, bad, backend)
        for edge in spec.edge_inputs:
            check_edge_input(spec, edge, backend, device)
        n += 1 + len(spec.bad_inputs) + len(spec.edge_inputs)
    return n
