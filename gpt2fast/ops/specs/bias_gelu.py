"""``bias_gelu``: the MLP's bias add fused with GPT-2's tanh GELU ("gelu_new")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2fast.ops import _spec
from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, row_cases, seeded_randn

ARGS = ("x", "bias")
GRAD_ARGS = ("x", "bias")


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """gelu_tanh(x + bias) (GPT-2's "gelu_new") for ``x`` [..., N] and ``bias`` [N]."""
    validate(x, bias)
    return dispatch("bias_gelu", backend, (x, bias), x.device)


def validate(x, bias) -> None:
    """The checks every backend relies on."""
    v.check_float("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension [..., N]")
    v.check_nonempty("x", x)
    v.check_same("x", x, bias=bias)
    v.check_shape("bias", bias, (x.shape[-1],))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's "gelu_new": 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def reference(x, bias):
    """gelu_tanh(x + bias) in the input dtype."""
    return gelu_tanh(x + bias)


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``rows`` (an int or a tuple of leading dims) and ``n``; optional ``std`` (default 3)."""
    randn = seeded_randn(gen, device, dtype)
    rows = shape["rows"] if isinstance(shape["rows"], tuple) else (shape["rows"],)
    return dict(x=randn(*rows, shape["n"], std=shape.get("std", 3.0)), bias=randn(shape["n"], std=0.1))


TEST_SHAPES = tuple(
    dict(rows=rows, n=n) for rows, n in [((1, 1), 3072), ((2, 3), 1600), (7, 100), (1, 1), (5, 1601), (9, 12)]
)
GPU_SHAPES = tuple(dict(rows=rows, n=n) for rows, n in [(4096, 6400), ((8, 1024), 3072), (3, 7)])


def shape_strategy(size: int):
    """Hypothesis: 0-2 leading dims, widths up to 600·size or a GPT-2 MLP width, std up to 30."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        dict(
            rows=st.lists(st.integers(1, 3 * size), min_size=0, max_size=2).map(tuple),
            n=st.one_of(st.integers(1, 600 * size), st.sampled_from([3072, 4096, 5120, 6400])),
            std=st.sampled_from([0.5, 3.0, 30.0]),
        )
    )


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(x=None, bias=None) -> Inputs:
    x = _rn(3, 32) if x is None else x
    return dict(x=x, bias=_rn(x.shape[-1]) if bias is None else bias)


BAD_INPUTS = (
    BadInput("gelu-not-tensor", "x a list", lambda: _args(x=[[1.0, 2.0]], bias=_rn(2)),
             TypeError, r"x must be a torch\.Tensor, got list"),
    BadInput("gelu-int", "x int32", lambda: _args(x=torch.ones(3, 32, dtype=torch.int32)),
             TypeError, r"x must be float32, float16 or bfloat16, got torch\.int32"),
    BadInput("gelu-mixed-dtype", "x fp32, bias bf16", lambda: _args(bias=_rn(32, dtype=torch.bfloat16)),
             TypeError, r"bias has dtype torch\.bfloat16 but x has torch\.float32; they must match"),
    BadInput("gelu-bias-len", "bias [33] for rows of 32", lambda: _args(bias=_rn(33)),
             ValueError, r"bias must have shape \[32\], got \[33\]"),
    BadInput("gelu-other-device", "bias on another device (meta)", lambda: _args(bias=_rn(32, device="meta")),
             RuntimeError, r"bias is on meta but x is on cpu; move them to one device"),
    BadInput("gelu-empty", "x [2, 0, 32] (batch of 0 rows)", lambda: _args(x=_rn(2, 0, 32)),
             ValueError, r"x is empty \(shape \[2, 0, 32\]\); every dimension must be >= 1"),
    BadInput("gelu-scalar", "x 0-D", lambda: _args(x=torch.tensor(1.0), bias=_rn(1)),
             ValueError, r"x must have at least 1 dimension \[\.\.\., N\]"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("gelu-transposed", "x a transposed [32, 3] view",
              lambda d: _args(x=_rn(3, 32, device=d).t(), bias=_rn(3, device=d))),
    EdgeInput("gelu-row-stride", "x rows of 3072 inside rows of 4096 (a column slice)",
              lambda d: _args(x=_rn(4, 4096, device=d)[:, :3072], bias=_rn(3072, device=d))),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
def bench_cases(sweep: str) -> list[BenchCase]:
    """GPT-2 MLP widths (3072..6400) from 1 to 64k rows; tiny shapes for the CPU sweep."""
    return row_cases("bias_gelu", sweep, {"full": [3072, 4096, 5120, 6400], "quick": [3072, 6400], "cpu": [192, 400]})


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read x and bias, write y."""
    s = torch.empty((), dtype=dtype).element_size()
    rows = _spec.row_count(shape)
    return Traffic(s * (2 * rows * shape["n"] + shape["n"]))


CHECK_ROWS = 4096


def check_inputs(shape: dict, inputs: Inputs) -> Inputs:
    """The first 4096 rows."""
    return dict(x=inputs["x"][:CHECK_ROWS], bias=inputs["bias"])


def check_outputs(shape: dict, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same rows."""
    return [o[:CHECK_ROWS] for o in outputs]


def baselines(device: torch.device) -> dict:
    """PyTorch eager: a bias add, then ``F.gelu(approximate="tanh")``."""

    def torch_eager(inp: Inputs):
        x, b = inp["x"], inp["bias"]
        return lambda: F.gelu(x + b, approximate="tanh")

    return {"torch": torch_eager}


register_op(OpSpec.from_module(__name__))
