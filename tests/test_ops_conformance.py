"""Conformance of every (op, backend) pair in the registry, driven by the op specs (gpt2fast.testing.conformance).

Nothing here names an op or a backend: the cases come from ``ops.specs()`` and ``ops.implementations()``, so a
newly registered op or backend is tested by this file as it is.  On a machine without CUDA, Triton runs under
its interpreter (conftest) and the ``gpu`` cases skip; a backend unavailable here skips its value checks with
the reason, while the bad-input and edge-input verdicts (metadata only) still run for it.
"""

from __future__ import annotations

import pytest
import torch
from _backends import DEVICE

from gpt2fast import ops
from gpt2fast.ops._spec import shape_id
from gpt2fast.testing import conformance as cf

# The kernels' tanh is 2/(1 + exp(-2x)) - 1: exp overflowing to inf for large |x| is intended (it saturates to
# ±1), but Triton's interpreter computes it with numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DEV = torch.device(DEVICE)
LOW = (torch.float16, torch.bfloat16)


def _pairs():
    """(spec, backend, unavailability reason or None) for every registered implementation."""
    return [(ops.get_spec(r.op), r.backend, r.reason) for r in ops.implementations(DEV)]


def _param(spec, backend, reason, *rest, marks=(), id_=""):
    skip = pytest.mark.skipif(reason is not None, reason=f"{backend} unavailable on {DEVICE}: {reason}")
    return pytest.param(spec, backend, *rest, marks=[skip, *marks], id=f"{spec.name}-{backend}{id_}")


def _inputs(spec, shape, dtype):
    return spec.make_inputs(shape, dtype, DEV, torch.Generator().manual_seed(cf.SEED))


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


PARITY = [
    _param(spec, be, why, shape, dtype, id_=f"-{shape_id(shape)}-{_dtype_id(dtype)}")
    for spec, be, why in _pairs()
    for shape in spec.test_shapes
    for dtype in spec.dtypes
]
GPU_PARITY = [
    _param(spec, be, why, shape, dtype, marks=[pytest.mark.gpu], id_=f"-{shape_id(shape)}-{_dtype_id(dtype)}")
    for spec, be, why in _pairs()
    for shape in spec.gpu_shapes
    for dtype in LOW
]
VIEWS = [
    _param(spec, be, why, shape, dtype, view, id_=f"-{view.id}-{shape_id(shape)}-{_dtype_id(dtype)}")
    for spec, be, why in _pairs()
    for view in cf.views(spec)
    for shape in spec.test_shapes[:2]
    for dtype in (torch.float32, torch.float16)
]
DETERMINISM = [
    _param(spec, be, why, shape, dtype, id_=f"-{shape_id(shape)}-{_dtype_id(dtype)}")
    for spec, be, why in _pairs()
    for shape in spec.test_shapes[:2]
    for dtype in spec.dtypes
]
GRADIENTS = [
    _param(spec, be, why, shape, dtype, id_=f"-{shape_id(shape)}-{_dtype_id(dtype)}")
    for spec, be, why in _pairs()
    if cf.differentiable(spec, be)
    for shape in spec.test_shapes
    for dtype in spec.dtypes
]
GPU_GRADIENTS = [
    _param(spec, be, why, shape, dtype, marks=[pytest.mark.gpu], id_=f"-{shape_id(shape)}-{_dtype_id(dtype)}")
    for spec, be, why in _pairs()
    if cf.differentiable(spec, be) and be != ops.REFERENCE
    for shape in spec.gpu_shapes
    for dtype in LOW
]
BAD = [
    pytest.param(spec, bad, be, id=f"{bad.id}-{be}")
    for spec in ops.specs()
    for bad in spec.bad_inputs
    for be in [*ops.backend_names(), None]
]
EDGE = [_param(spec, be, None, edge, why, id_=f"-{edge.id}") for spec, be, why in _pairs() for edge in spec.edge_inputs]


@pytest.mark.parametrize(("spec", "backend", "shape", "dtype"), PARITY)
def test_parity(spec, backend, shape, dtype):
    """Outputs and in-place writes match the oracle under the FlashAttention rule; inputs untouched."""
    cf.check_parity(spec, backend, _inputs(spec, shape, dtype), shape=shape)


@pytest.mark.parametrize(("spec", "backend", "shape", "dtype"), GPU_PARITY)
def test_parity_gpu_shapes(spec, backend, shape, dtype):
    """The larger GPT-2-sized shapes, on a GPU."""
    cf.check_parity(spec, backend, _inputs(spec, shape, dtype), shape=shape)


@pytest.mark.parametrize(("spec", "backend", "shape", "dtype"), GRADIENTS)
def test_gradients(spec, backend, shape, dtype):
    """Every differentiable (op, backend) pair: the gradients of a random upstream gradient, for every argument
    that takes one, match the oracle's autograd gradients under the FlashAttention rule."""
    cf.check_gradients(spec, backend, _inputs(spec, shape, dtype), shape=shape)


@pytest.mark.parametrize(("spec", "backend", "shape", "dtype"), GPU_GRADIENTS)
def test_gradients_gpu_shapes(spec, backend, shape, dtype):
    """The gradients at the larger GPT-2-sized shapes, on a GPU."""
    cf.check_gradients(spec, backend, _inputs(spec, shape, dtype), shape=shape)


@pytest.mark.parametrize(("spec", "backend", "shape", "dtype", "view"), VIEWS)
def test_strides_and_views(spec, backend, shape, dtype, view):
    """Other layouts of the same values: handled exactly like contiguous ones, or declined before any launch
    (then "auto" falls through to a backend that handles them)."""
    cf.check_view(spec, backend, _inputs(spec, shape, dtype), view)


@pytest.mark.parametrize(("spec", "backend", "shape", "dtype"), DETERMINISM)
def test_determinism(spec, backend, shape, dtype):
    """Two runs on the same inputs are bit-identical (outputs and in-place writes)."""
    cf.check_determinism(spec, backend, _inputs(spec, shape, dtype))


@pytest.mark.parametrize(("spec", "bad", "backend"), BAD)
def test_bad_input_reaches_no_backend(spec, bad, backend):
    """Every backend (None: the process default), available here or not: the shared validation refuses the input
    with a message naming the argument, and no implementation is ever called."""
    cf.check_bad_input(spec, bad, backend)


@pytest.mark.parametrize(("spec", "backend", "edge", "unavailable"), EDGE)
def test_edge_input_is_handled_or_declined(spec, backend, edge, unavailable):
    """A valid but unusual input: the backend declines it before launch (a named call raises the reason, "auto"
    falls through) or matches the reference.  Where the backend cannot run here, only its verdict is checked."""
    if unavailable is not None:
        verdict = cf.edge_verdict(spec, edge, backend)
        assert verdict is None or (isinstance(verdict, str) and verdict)
        return
    cf.check_edge_input(spec, edge, backend, DEV)


def test_every_op_has_cases_for_every_check():
    """Each spec feeds every check above (so none of them silently runs zero cases for an op)."""
    for spec in ops.specs():
        assert spec.test_shapes and spec.bad_inputs and spec.edge_inputs, spec.name
        assert spec.gpu_shapes and spec.shape_strategy is not None, spec.name
        assert any(p.values[0] is spec for p in PARITY)
