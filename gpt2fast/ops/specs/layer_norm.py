"""``layer_norm``: LayerNorm over the last dim, optionally fused with the residual add in front of it."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2fast.ops import _spec
from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, row_cases, seeded_randn

ARGS = ("x", "weight", "bias", "eps", "residual")
GRAD_ARGS = ("x", "weight", "bias", "residual")


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of ``x`` ([..., N]).

    With ``residual`` it returns ``(y, h)`` where ``h = x + residual`` and ``y = LN(h)``: the fused
    add-and-norm of a pre-LN block.
    """
    validate(x, weight, bias, eps, residual)
    return dispatch("layer_norm", backend, (x, weight, bias, eps, residual), x.device)


def validate(x, weight, bias, eps, residual) -> None:
    """The checks every backend relies on (raise before any backend is reached)."""
    v.check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., N]")
    v.check_nonempty("x", x)
    v.check_same("x", x, weight=weight, bias=bias, residual=residual)
    n = x.shape[-1]
    v.check_shape("weight", weight, (n,))
    v.check_shape("bias", bias, (n,))
    if residual is not None:
        v.check_shape("residual", residual, tuple(x.shape))
    if not v.positive_finite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def reference(x, weight, bias, eps=1e-5, residual=None):
    """``F.layer_norm`` in the input dtype; with ``residual`` returns ``(LN(x + residual), x + residual)``."""
    h = x if residual is None else x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)
    return y if residual is None else (y, h)


def plain_or_fused(plain: Callable, fused: Callable) -> Callable:
    """A backend's implementation from its two kernels: ``plain(x, weight, bias, eps)`` -> ``y`` and
    ``fused(x, weight, bias, eps, residual)`` -> ``(y, h)`` (``eps`` passed as a float)."""

    def layer_norm(x, weight, bias, eps, residual):
        if residual is None:
            return plain(x, weight, bias, float(eps))
        return tuple(fused(x, weight, bias, float(eps), residual))

    return layer_norm


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``rows`` (an int or a tuple of leading dims), ``n``, ``residual``; optional ``std``, ``eps``."""
    randn = seeded_randn(gen, device, dtype)
    rows = shape["rows"] if isinstance(shape["rows"], tuple) else (shape["rows"],)
    n, std = shape["n"], shape.get("std", 1.0)
    return dict(
        x=randn(*rows, n, std=std),
        weight=1 + randn(n, std=0.1),
        bias=randn(n, std=0.1),
        eps=shape.get("eps", 1e-5),
        residual=randn(*rows, n, std=std) if shape["residual"] else None,
    )


TEST_SHAPES = tuple(
    dict(rows=rows, n=n, residual=res)
    for rows, n in [((1, 1), 768), ((2, 3), 1600), (5, 1280), (3, 100), (1, 1), (7, 33)]
    for res in (False, True)
)
GPU_SHAPES = tuple(
    dict(rows=rows, n=n, residual=True) for rows, n in [(4096, 1600), ((8, 1024), 768), (2, 12288), (300, 64)]
)


def shape_strategy(size: int):
    """Hypothesis: 0-2 leading dims, any width up to 300·size or a GPT-2 width, std and eps varied."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        dict(
            rows=st.lists(st.integers(1, 3 * size), min_size=0, max_size=2).map(tuple),
            n=st.one_of(st.integers(1, 300 * size), st.sampled_from([768, 1024, 1280, 1600])),
            residual=st.booleans(),
            std=st.sampled_from([0.1, 1.0, 10.0]),
            eps=st.sampled_from([1e-5, 1e-3]),
        )
    )


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(x=None, weight=None, bias=None, eps=1e-5, residual=None, n=32) -> Inputs:
    x = _rn(3, n) if x is None else x
    weight = _rn(x.shape[-1]) if weight is None else weight
    bias = _rn(x.shape[-1]) if bias is None else bias
    return dict(x=x, weight=weight, bias=bias, eps=eps, residual=residual)


BAD_INPUTS = (
    BadInput("ln-dtype-fp64", "x float64", lambda: _args(x=_rn(3, 32, dtype=torch.float64)),
             TypeError, r"x must be float32, float16 or bfloat16, got torch\.float64"),
    BadInput("ln-int", "x int64", lambda: _args(x=torch.ones(3, 32, dtype=torch.int64)),
             TypeError, r"x must be float32, float16 or bfloat16, got torch\.int64"),
    BadInput("ln-not-tensor", "x a list", lambda: _args(x=[1.0], weight=_rn(1), bias=_rn(1)),
             TypeError, r"x must be a torch\.Tensor, got list"),
    BadInput("ln-mixed-dtype", "x fp32, weight fp16", lambda: _args(weight=_rn(32, dtype=torch.float16)),
             TypeError, r"weight has dtype torch\.float16 but x has torch\.float32; they must match"),
    BadInput("ln-other-device", "bias on another device (meta)", lambda: _args(bias=_rn(32, device="meta")),
             RuntimeError, r"bias is on meta but x is on cpu; move them to one device"),
    BadInput("ln-weight-len", "weight [31] for rows of 32", lambda: _args(weight=_rn(31)),
             ValueError, r"weight must have shape \[32\], got \[31\]"),
    BadInput("ln-residual-shape", "residual [3, 1, 32] for x [3, 32]", lambda: _args(residual=_rn(3, 1, 32)),
             ValueError, r"residual must have shape \[3, 32\], got \[3, 1, 32\]"),
    BadInput("ln-empty", "x [0, 32] (no rows)", lambda: _args(x=_rn(0, 32)),
             ValueError, r"x is empty \(shape \[0, 32\]\); every dimension must be >= 1"),
    BadInput("ln-scalar", "x 0-D", lambda: _args(x=torch.tensor(1.0), weight=_rn(1), bias=_rn(1)),
             ValueError, r"x must have at least 1 dimension \[\.\.\., N\]"),
    BadInput("ln-eps-zero", "eps=0", lambda: _args(eps=0.0),
             ValueError, r"eps must be a positive finite number, got 0\.0"),
    BadInput("ln-eps-inf", "eps=inf (gave all-zero rows before)", lambda: _args(eps=math.inf),
             ValueError, r"eps must be a positive finite number, got inf"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("ln-strided-last-dim", "x[:, ::2] (last-dim stride 2)",
              lambda d: _args(x=_rn(3, 64, device=d)[:, ::2], weight=_rn(32, device=d), bias=_rn(32, device=d))),
    EdgeInput("ln-residual-transposed", "residual a transposed view (rows share no single stride)",
              lambda d: _args(x=_rn(4, 6, 32, device=d), weight=_rn(32, device=d), bias=_rn(32, device=d),
                              residual=_rn(6, 4, 32, device=d).transpose(0, 1))),
    EdgeInput("ln-too-wide", "rows of 16400 (wider than a row held in registers)",
              lambda d: _args(x=_rn(1, 16400, device=d), weight=_rn(16400, device=d), bias=_rn(16400, device=d))),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
#: The widths of the sweeps (GPT-2's n_embd, 768..1600; tiny ones on CPU), the backward's too.
WIDTHS = {"full": [768, 1024, 1280, 1600], "quick": [768, 1600], "cpu": [48, 100]}


def bench_cases(sweep: str) -> list[BenchCase]:
    """GPT-2 widths (768..1600), with and without the residual, from 1 to 64k rows; tiny shapes on CPU."""
    return row_cases("layer_norm", sweep, WIDTHS, residual=[False, True])


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read x (and residual), weight, bias; write y (and h = x + residual)."""
    s = torch.empty((), dtype=dtype).element_size()
    rows = _spec.row_count(shape)
    tensors = 4 if shape["residual"] else 2
    return Traffic(s * (tensors * rows * shape["n"] + 2 * shape["n"]))


CHECK_ROWS = 4096


def check_inputs(shape: dict, inputs: Inputs) -> Inputs:
    """The first 4096 rows (rows are independent)."""
    return {k: (t[:CHECK_ROWS] if k in ("x", "residual") and t is not None else t) for k, t in inputs.items()}


def check_outputs(shape: dict, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same rows of y (and h)."""
    return [o[:CHECK_ROWS] for o in outputs]


def baselines(device: torch.device) -> dict:
    """PyTorch eager: ``F.layer_norm`` after a separate residual add."""

    def torch_eager(inp: Inputs):
        x, w, b, eps, res = (inp[a] for a in ARGS)
        n = (x.shape[-1],)
        if res is None:
            return lambda: F.layer_norm(x, n, w, b, eps)

        def run():
            h = x + res
            return F.layer_norm(h, n, w, b, eps), h

        return run

    return {"torch": torch_eager}


register_op(OpSpec.from_module(__name__))
