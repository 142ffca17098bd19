"""``bias_gelu_backward``: the gradients of ``bias_gelu`` (``gelu_tanh(x + bias)``).

``grad_x = grad_y * gelu_tanh'(x + bias)`` and ``grad_bias`` = the sum of ``grad_x`` over every leading dim
(accumulated in fp32 in the kernels).  The forward saves only its inputs; the derivative is recomputed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2fast.ops import _spec
from gpt2fast.ops import _validate as v
from gpt2fast.ops._autograd import run_backward
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, row_cases, seeded_randn

ARGS = ("grad_y", "x", "bias")


def bias_gelu_backward(
    grad_y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``y = gelu_tanh(x + bias)`` (``x`` [..., N], ``bias`` [N]) given ``grad_y``: ``(dx, dbias)``."""
    validate(grad_y, x, bias)
    return dispatch("bias_gelu_backward", backend, (grad_y, x, bias), x.device)


def validate(grad_y, x, bias) -> None:
    """The checks every backend relies on."""
    v.check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., N]")
    v.check_nonempty("x", x)
    v.check_same("x", x, grad_y=grad_y, bias=bias)
    v.check_shape("grad_y", grad_y, tuple(x.shape))
    v.check_shape("bias", bias, (x.shape[-1],))


def reference(grad_y, x, bias):
    """PyTorch's own backward of ``F.gelu(x + bias, approximate="tanh")`` (the same function as the forward's
    reference formula) in the input dtype.  Autograd through the formula itself would overflow x³ in fp16 for
    |x| > 40 and give 0 · inf = NaN where the slope is exactly 1."""
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        b_ = bias.detach().requires_grad_(True)
        return torch.autograd.grad(F.gelu(x_ + b_, approximate="tanh"), (x_, b_), grad_y)


def register_autograd(op, backend: str) -> None:
    """Make a backend's custom op ``op(x, bias) -> gelu_tanh(x + bias)`` differentiable: it saves its inputs and
    runs this op in its backward, on ``backend`` where it can (see :func:`gpt2fast.ops._autograd.run_backward`);
    nothing is saved when no input requires grad."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_y):
        x, bias = ctx.saved_tensors
        return run_backward("bias_gelu_backward", backend, grad_y, x, bias)

    op.register_autograd(backward, setup_context=setup)


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``rows`` (an int or a tuple of leading dims) and ``n``; optional ``std`` of ``x`` (3)."""
    randn = seeded_randn(gen, device, dtype)
    rows = shape["rows"] if isinstance(shape["rows"], tuple) else (shape["rows"],)
    n = shape["n"]
    return dict(grad_y=randn(*rows, n), x=randn(*rows, n, std=shape.get("std", 3.0)), bias=randn(n, std=0.1))


TEST_SHAPES = tuple(
    dict(rows=rows, n=n) for rows, n in [((1, 1), 3072), ((2, 3), 1600), (70, 100), (1, 1), (5, 1601), (9, 12)]
)
GPU_SHAPES = tuple(dict(rows=rows, n=n) for rows, n in [(8192, 3072), (4096, 6400), (3, 7)])


def shape_strategy(size: int):
    """Hypothesis: 0-2 leading dims, widths up to 600·size or a GPT-2 MLP width, std up to 30."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        dict(
            rows=st.lists(st.integers(1, 3 * size), min_size=0, max_size=2).map(tuple),
            n=st.one_of(st.integers(1, 600 * size), st.sampled_from([3072, 4096])),
            std=st.sampled_from([0.5, 3.0, 30.0]),
        )
    )


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(grad_y=None, x=None, bias=None) -> Inputs:
    x = _rn(3, 32) if x is None else x
    grad_y = _rn(*x.shape) if grad_y is None else grad_y
    return dict(grad_y=grad_y, x=x, bias=_rn(x.shape[-1]) if bias is None else bias)


BAD_INPUTS = (
    BadInput("gelub-grad-shape", "grad_y [3, 33] for x [3, 32]", lambda: _args(grad_y=_rn(3, 33)),
             ValueError, r"grad_y must have shape \[3, 32\], got \[3, 33\]"),
    BadInput("gelub-mixed-dtype", "grad_y bf16 with x fp32", lambda: _args(grad_y=_rn(3, 32, dtype=torch.bfloat16)),
             TypeError, r"grad_y has dtype torch\.bfloat16 but x has torch\.float32; they must match"),
    BadInput("gelub-bias-len", "bias [31]", lambda: _args(bias=_rn(31)),
             ValueError, r"bias must have shape \[32\], got \[31\]"),
    BadInput("gelub-int", "x int32", lambda: _args(x=torch.ones(3, 32, dtype=torch.int32)),
             TypeError, r"x must be float32, float16 or bfloat16, got torch\.int32"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("gelub-transposed", "x a transposed [32, 3] view",
              lambda d: dict(grad_y=_rn(32, 3, device=d), x=_rn(3, 32, device=d).t(), bias=_rn(3, device=d))),
    EdgeInput("gelub-row-stride", "x rows of 3072 inside rows of 4096 (a column slice)",
              lambda d: dict(grad_y=_rn(4, 3072, device=d), x=_rn(4, 4096, device=d)[:, :3072],
                             bias=_rn(3072, device=d))),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
def bench_cases(sweep: str) -> list[BenchCase]:
    """GPT-2 MLP widths (3072..6400) from 1 to 64k rows; tiny shapes for the CPU sweep."""
    widths = {"full": [3072, 4096, 5120, 6400], "quick": [3072, 6400], "cpu": [192, 400]}
    return row_cases("bias_gelu_backward", sweep, widths)


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read grad_y, x and bias; write dx and dbias."""
    s = torch.empty((), dtype=dtype).element_size()
    rows = _spec.row_count(shape)
    return Traffic(s * (3 * rows * shape["n"] + 2 * shape["n"]))


def baselines(device: torch.device) -> dict:
    """PyTorch: the backward of ``F.gelu(x + bias, approximate="tanh")`` (a retained graph: the backward alone)."""

    def torch_eager(inp: Inputs):
        x = inp["x"].detach().requires_grad_(True)
        b = inp["bias"].detach().requires_grad_(True)
        y = F.gelu(x + b, approximate="tanh")
        return lambda: torch.autograd.grad(y, (x, b), inp["grad_y"], retain_graph=True)

    return {"torch": torch_eager}


register_op(OpSpec.from_module(__name__))
