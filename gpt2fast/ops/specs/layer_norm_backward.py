"""``layer_norm_backward``: the gradients of ``layer_norm`` (with or without the fused residual add).

The backward of ``y = LN(h) = (h - mean) * rstd * weight + bias`` over the last dim, where ``h`` is the normalised
input (``x``, or ``x + residual`` with the fused residual; the forward's second output).  The statistics are
recomputed from ``h`` (a row is read anyway), so the forward saves nothing but its input or its ``h`` output.
With the fused residual, ``grad_h`` (the gradient reaching the ``h`` output: the residual stream) is added to the
gradient of ``h``; that sum is the gradient of both ``x`` and ``residual``.  Returns ``(grad_h_total,
grad_weight, grad_bias)`` in the input dtype (the column sums accumulate in fp32 in the kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2fast.ops import _spec
from gpt2fast.ops import _validate as v
from gpt2fast.ops._autograd import run_backward
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, row_cases, seeded_randn
from gpt2fast.ops.specs import layer_norm as fwd

ARGS = ("grad_y", "h", "weight", "eps", "grad_h")


def layer_norm_backward(
    grad_y: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    grad_h: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``y = LN(h)`` over the last dim of ``h`` ([..., N]) given ``grad_y``: ``(dh, dweight, dbias)``.

    ``dh`` includes ``grad_h`` when given (the gradient of the fused residual add's ``h`` output), so it is the
    gradient of both ``x`` and ``residual`` of ``layer_norm(x, weight, bias, eps, residual)``.
    """
    validate(grad_y, h, weight, eps, grad_h)
    return dispatch("layer_norm_backward", backend, (grad_y, h, weight, eps, grad_h), h.device)


def validate(grad_y, h, weight, eps, grad_h) -> None:
    """The checks every backend relies on."""
    v.check_float("h", h)
    if h.dim() < 1:
        raise ValueError("h must have at least 1 dimension [..., N]")
    v.check_nonempty("h", h)
    v.check_same("h", h, grad_y=grad_y, weight=weight, grad_h=grad_h)
    v.check_shape("grad_y", grad_y, tuple(h.shape))
    v.check_shape("weight", weight, (h.shape[-1],))
    if grad_h is not None:
        v.check_shape("grad_h", grad_h, tuple(h.shape))
    if not v.positive_finite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def reference(grad_y, h, weight, eps=1e-5, grad_h=None):
    """PyTorch's own backward of ``F.layer_norm`` in the input dtype (plus ``grad_h``)."""
    with torch.enable_grad():
        h_ = h.detach().requires_grad_(True)
        w_ = weight.detach().requires_grad_(True)
        b_ = torch.zeros_like(weight, requires_grad=True)
        y = F.layer_norm(h_, (h.shape[-1],), w_, b_, eps)
        dh, dw, db = torch.autograd.grad(y, (h_, w_, b_), grad_y)
    return (dh if grad_h is None else dh + grad_h), dw, db


def register_autograd(plain, fused, backend: str) -> None:
    """Make a backend's two LayerNorm custom ops differentiable: ``plain(x, weight, bias, eps) -> y`` saves ``x``,
    ``fused(x, weight, bias, eps, residual) -> (y, h)`` saves its output ``h``; both save ``weight`` and run this op
    in their backward, on ``backend`` where it can (see :func:`gpt2fast.ops._autograd.run_backward`).  Nothing is
    saved when no input requires grad (``torch.library``'s autograd wrapper then calls the op directly)."""

    def setup_plain(ctx, inputs, output):
        x, weight, _bias, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    def backward_plain(ctx, grad_y):
        x, weight = ctx.saved_tensors
        dx, dw, db = run_backward("layer_norm_backward", backend, grad_y, x, weight, ctx.eps, None)
        return dx, dw, db, None

    def setup_fused(ctx, inputs, output):
        _x, weight, _bias, eps, _residual = inputs
        ctx.save_for_backward(output[1], weight)
        ctx.eps = eps

    def backward_fused(ctx, grad_y, grad_h):
        h, weight = ctx.saved_tensors
        dh, dw, db = run_backward("layer_norm_backward", backend, grad_y, h, weight, ctx.eps, grad_h)
        return dh, dw, db, None, dh

    plain.register_autograd(backward_plain, setup_context=setup_plain)
    fused.register_autograd(backward_fused, setup_context=setup_fused)


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``rows`` (an int or a tuple of leading dims), ``n``, ``residual`` (a ``grad_h``); optional
    ``std`` and ``mean`` of ``h``, ``eps``."""
    randn = seeded_randn(gen, device, dtype)
    rows = shape["rows"] if isinstance(shape["rows"], tuple) else (shape["rows"],)
    n = shape["n"]
    return dict(
        grad_y=randn(*rows, n),
        h=randn(*rows, n, std=shape.get("std", 1.0), mean=shape.get("mean", 0.0)),
        weight=1 + randn(n, std=0.1),
        eps=shape.get("eps", 1e-5),
        grad_h=randn(*rows, n) if shape["residual"] else None,
    )


TEST_SHAPES = (
    *(
        dict(rows=rows, n=n, residual=res)
        for rows, n in [((1, 1), 768), ((2, 3), 1600), (70, 100), (1, 1), (7, 33)]
        for res in (False, True)
    ),
    dict(rows=9, n=48, residual=True, mean=50.0, std=0.5),
    # One column: h - mean is exactly 0, so the exact dweight is 0; PyTorch's own fp32 backward misses it by ~3e-4
    # on values ~10 (Hypothesis found it), which is why an fp32 result's oracle runs in fp64.
    dict(rows=2, n=1, residual=False, std=10.0),
)
GPU_SHAPES = tuple(
    dict(rows=rows, n=n, residual=True) for rows, n in [(8192, 768), (4096, 1600), (2, 12288), (300, 64)]
)


#: Hypothesis shapes: the forward's (0-2 leading dims, widths up to 300·size or a GPT-2 width, with or without
#: ``grad_h``, std and eps varied).
shape_strategy = fwd.shape_strategy


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(grad_y=None, h=None, weight=None, eps=1e-5, grad_h=None, device="cpu") -> Inputs:
    h = _rn(3, 32, device=device) if h is None else h
    grad_y = _rn(*h.shape, device=device) if grad_y is None else grad_y
    weight = _rn(h.shape[-1], device=device) if weight is None else weight
    return dict(grad_y=grad_y, h=h, weight=weight, eps=eps, grad_h=grad_h)


BAD_INPUTS = (
    BadInput("lnb-grad-shape", "grad_y [3, 31] for h [3, 32]", lambda: _args(grad_y=_rn(3, 31)),
             ValueError, r"grad_y must have shape \[3, 32\], got \[3, 31\]"),
    BadInput("lnb-mixed-dtype", "grad_y fp16 with h fp32", lambda: _args(grad_y=_rn(3, 32, dtype=torch.float16)),
             TypeError, r"grad_y has dtype torch\.float16 but h has torch\.float32; they must match"),
    BadInput("lnb-grad-h-shape", "grad_h [32] for h [3, 32]", lambda: _args(grad_h=_rn(32)),
             ValueError, r"grad_h must have shape \[3, 32\], got \[32\]"),
    BadInput("lnb-weight-len", "weight [33]", lambda: _args(weight=_rn(33)),
             ValueError, r"weight must have shape \[32\], got \[33\]"),
    BadInput("lnb-eps-nan", "eps=nan", lambda: _args(eps=math.nan),
             ValueError, r"eps must be a positive finite number, got nan"),
    BadInput("lnb-empty", "h [0, 32]", lambda: _args(h=_rn(0, 32)),
             ValueError, r"h is empty \(shape \[0, 32\]\); every dimension must be >= 1"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("lnb-strided", "grad_y a transposed view, h rows inside wider rows",
              lambda d: _args(grad_y=_rn(32, 3, device=d).t(), h=_rn(3, 48, device=d)[:, :32], device=d)),
    EdgeInput("lnb-too-wide", "rows of 16400 (wider than a row held in registers)",
              lambda d: _args(h=_rn(2, 16400, device=d), grad_h=_rn(2, 16400, device=d), device=d)),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
def bench_cases(sweep: str) -> list[BenchCase]:
    """GPT-2 widths, with and without ``grad_h``, from 1 to 64k rows; tiny shapes on CPU."""
    return row_cases("layer_norm_backward", sweep, fwd.WIDTHS, residual=[False, True])


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read grad_y, h (and grad_h), weight; write dh, dweight, dbias."""
    s = torch.empty((), dtype=dtype).element_size()
    rows = _spec.row_count(shape)
    tensors = 4 if shape["residual"] else 3
    return Traffic(s * (tensors * rows * shape["n"] + 3 * shape["n"]))


def baselines(device: torch.device) -> dict:
    """PyTorch's backward of ``F.layer_norm`` (a retained graph, so only the backward is timed), plus ``grad_h``."""

    def torch_eager(inp: Inputs):
        h = inp["h"].detach().requires_grad_(True)
        w = inp["weight"].detach().requires_grad_(True)
        b = torch.zeros_like(w, requires_grad=True)
        y = F.layer_norm(h, (h.shape[-1],), w, b, inp["eps"])
        grad_h = inp["grad_h"]

        def run():
            dh, dw, db = torch.autograd.grad(y, (h, w, b), inp["grad_y"], retain_graph=True)
            return (dh if grad_h is None else dh + grad_h), dw, db

        return run

    return {"torch": torch_eager}


register_op(OpSpec.from_module(__name__))
