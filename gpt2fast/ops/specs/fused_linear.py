"""``fused_linear``: a decode-step linear layer with its neighbours fused in.

``[residual +] gelu?(LN?(x) @ weight.T + bias)``: the LayerNorm in front of it as a prologue, the bias, GPT-2's
GELU and the residual add as an epilogue.  One op covers every GEMV of a fused decode step: the QKV projection
(ln_1 + bias), c_fc (ln_2 + bias + GELU), both output projections (bias + residual) and the LM head over the
tied embedding (ln_f, no bias).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, seeded_randn
from gpt2fast.ops.specs.bias_gelu import gelu_tanh

ARGS = ("x", "weight", "bias", "ln_weight", "ln_bias", "eps", "gelu", "residual")


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    gelu: bool = False,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``[residual +] gelu?(LN?(x) @ weight.T + bias)`` for ``x`` [M, K] and ``weight`` [N, K] (``nn.Linear``'s
    layout); returns [M, N].

    ``ln_weight``/``ln_bias`` ([K], both or neither) apply a LayerNorm (``eps``) to the rows of ``x`` first;
    ``bias`` is [N] or None; ``gelu`` applies GPT-2's tanh GELU after the bias; ``residual`` ([M, N]) is added
    last.
    """
    validate(x, weight, bias, ln_weight, ln_bias, eps, gelu, residual)
    return dispatch("fused_linear", backend, (x, weight, bias, ln_weight, ln_bias, eps, gelu, residual), x.device)


def validate(x, weight, bias, ln_weight, ln_bias, eps, gelu, residual) -> None:
    """The checks every backend relies on."""
    v.check_float("x", x)
    v.check_rank("x", x, 2, "[M, K]")
    v.check_nonempty("x", x)
    v.check_float("weight", weight)
    v.check_rank("weight", weight, 2, "[N, K]")
    v.check_same("x", x, weight=weight, bias=bias, ln_weight=ln_weight, ln_bias=ln_bias, residual=residual)
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"weight must have shape [N, {k}] (x has K = {k}), got {v.fmt(weight.shape)}")
    v.check_nonempty("weight", weight)
    if bias is not None:
        v.check_shape("bias", bias, (n,))
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("ln_weight and ln_bias must be given together (both or neither)")
    if ln_weight is not None:
        v.check_shape("ln_weight", ln_weight, (k,))
        v.check_shape("ln_bias", ln_bias, (k,))
    if not v.positive_finite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if not isinstance(gelu, bool):
        raise TypeError(f"gelu must be a bool, got {type(gelu).__name__}")
    if residual is not None:
        v.check_shape("residual", residual, (m, n))


def reference(x, weight, bias=None, ln_weight=None, ln_bias=None, eps=1e-5, gelu=False, residual=None):
    """``F.layer_norm``, ``F.linear``, the GELU and the residual add, one after the other in the input dtype."""
    h = x if ln_weight is None else F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    y = F.linear(h, weight, bias)
    if gelu:
        y = gelu_tanh(y)
    return y if residual is None else residual + y


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``m``, ``k``, ``n`` and the flags ``ln``, ``bias``, ``gelu``, ``residual`` (default False);
    optional ``std`` of x.  Weights are N(0, 1/K), so outputs are O(1)."""
    randn = seeded_randn(gen, device, dtype)
    m, k, n = shape["m"], shape["k"], shape["n"]
    ln = shape.get("ln", False)
    return dict(
        x=randn(m, k, std=shape.get("std", 1.0)),
        weight=randn(n, k, std=k**-0.5),
        bias=randn(n, std=0.1) if shape.get("bias", False) else None,
        ln_weight=1 + randn(k, std=0.1) if ln else None,
        ln_bias=randn(k, std=0.1) if ln else None,
        eps=shape.get("eps", 1e-5),
        gelu=shape.get("gelu", False),
        residual=randn(m, n) if shape.get("residual", False) else None,
    )


def _s(m: int, k: int, n: int, *flags: str, **extra) -> dict:
    return dict(m=m, k=k, n=n, **{f: True for f in flags}, **extra)


TEST_SHAPES = (
    _s(1, 64, 48, "ln", "bias"),  # a QKV projection, batch 1
    _s(1, 1600, 200, "ln", "bias"),  # gpt2-xl's width through the LayerNorm prologue
    _s(13, 1600, 96, "ln", "bias", "gelu"),  # c_fc at batch 13
    _s(13, 100, 1600, "bias", "residual"),  # an output projection onto gpt2-xl's width
    _s(1, 1600, 16, "bias", "residual"),  # few output columns: split over K
    _s(16, 768, 40, "ln", std=10.0),  # batch 16, no bias (the LM head), split over K
    _s(2, 33, 7, "ln", "gelu", "residual"),  # odd sizes, every flag
    _s(5, 200, 300),  # a plain linear
)
GPU_SHAPES = (
    _s(1, 768, 2304, "ln", "bias"),
    _s(1, 768, 3072, "ln", "bias", "gelu"),
    _s(1, 768, 768, "bias", "residual"),
    _s(1, 3072, 768, "bias", "residual"),
    _s(8, 768, 50257, "ln"),
    _s(13, 1600, 4800, "ln", "bias"),
    _s(16, 6400, 1600, "bias", "residual"),
    _s(1, 1600, 50257, "ln"),
)


def shape_strategy(size: int):
    """Hypothesis: up to 16 rows (sometimes 17-20, beyond the decode kernels), K and N up to 300·size or a
    GPT-2 width, every combination of the flags, x's scale varied."""
    from hypothesis import strategies as st

    dims = st.one_of(st.integers(1, 300 * size), st.sampled_from([768, 1600]))
    return st.fixed_dictionaries(
        dict(
            m=st.one_of(st.integers(1, 16), st.integers(17, 20)),
            k=dims,
            n=st.integers(1, 300 * size),
            ln=st.booleans(),
            bias=st.booleans(),
            gelu=st.booleans(),
            residual=st.booleans(),
            std=st.sampled_from([0.1, 1.0, 10.0]),
        )
    )


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(m=3, k=32, n=8, device="cpu", **over) -> Inputs:
    kw = dict(x=_rn(m, k, device=device), weight=_rn(n, k, device=device), bias=_rn(n, device=device),
              ln_weight=_rn(k, device=device), ln_bias=_rn(k, device=device), eps=1e-5, gelu=False,
              residual=None)  # fmt: skip
    kw.update(over)
    return kw


BAD_INPUTS = (
    BadInput("fl-x-rank", "x 3-D", lambda: _args(x=_rn(1, 3, 32)),
             ValueError, r"x must be 2-D \[M, K\], got shape \[1, 3, 32\]"),
    BadInput("fl-x-empty", "x [0, 32]", lambda: _args(x=_rn(0, 32)),
             ValueError, r"x is empty \(shape \[0, 32\]\); every dimension must be >= 1"),
    BadInput("fl-x-int", "x int64", lambda: _args(x=torch.ones(3, 32, dtype=torch.int64)),
             TypeError, r"x must be float32, float16 or bfloat16, got torch\.int64"),
    BadInput("fl-weight-k", "weight [8, 31] for K = 32", lambda: _args(weight=_rn(8, 31)),
             ValueError, r"weight must have shape \[N, 32\] \(x has K = 32\), got \[8, 31\]"),
    BadInput("fl-weight-rank", "weight 1-D", lambda: _args(weight=_rn(32)),
             ValueError, r"weight must be 2-D \[N, K\], got shape \[32\]"),
    BadInput("fl-weight-empty", "weight [0, 32] (no output columns)", lambda: _args(weight=_rn(0, 32), bias=None),
             ValueError, r"weight is empty \(shape \[0, 32\]\); every dimension must be >= 1"),
    BadInput("fl-bias-len", "bias [7] for N = 8", lambda: _args(bias=_rn(7)),
             ValueError, r"bias must have shape \[8\], got \[7\]"),
    BadInput("fl-ln-alone", "ln_weight without ln_bias", lambda: _args(ln_bias=None),
             ValueError, r"ln_weight and ln_bias must be given together \(both or neither\)"),
    BadInput("fl-ln-len", "ln_bias [31] for K = 32", lambda: _args(ln_bias=_rn(31)),
             ValueError, r"ln_bias must have shape \[32\], got \[31\]"),
    BadInput("fl-residual-shape", "residual [3, 9] for an output [3, 8]", lambda: _args(residual=_rn(3, 9)),
             ValueError, r"residual must have shape \[3, 8\], got \[3, 9\]"),
    BadInput("fl-gelu-int", "gelu=1", lambda: _args(gelu=1),
             TypeError, r"gelu must be a bool, got int"),
    BadInput("fl-eps-nan", "eps=nan", lambda: _args(eps=math.nan),
             ValueError, r"eps must be a positive finite number, got nan"),
    BadInput("fl-mixed-dtype", "weight fp16 with x fp32", lambda: _args(weight=_rn(8, 32, dtype=torch.float16)),
             TypeError, r"weight has dtype torch\.float16 but x has torch\.float32; they must match"),
    BadInput("fl-other-device", "residual on another device (meta)", lambda: _args(residual=_rn(3, 8, device="meta")),
             RuntimeError, r"residual is on meta but x is on cpu; move them to one device"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("fl-17-rows", "17 rows (more than a decode step's 16)", lambda d: _args(m=17, device=d)),
    EdgeInput("fl-weight-transposed", "weight a transposed [K, N] view (K not contiguous)",
              lambda d: _args(weight=_rn(32, 8, device=d).t(), device=d)),
    EdgeInput("fl-x-strided", "x[:, ::2] (last-dim stride 2)",
              lambda d: _args(x=_rn(3, 64, device=d)[:, ::2], device=d)),
    EdgeInput("fl-residual-view", "residual a column slice of a wider tensor",
              lambda d: _args(residual=_rn(3, 20, device=d)[:, 4:12], device=d)),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
#: The GEMVs of a GPT-2 decode step: (name, K, N, flags) for width C and MLP width 4C.
def _decode_gemvs(c: int, vocab: int = 50257) -> list[tuple[str, int, int, tuple[str, ...]]]:
    return [
        ("qkv", c, 3 * c, ("ln", "bias")),
        ("attn_proj", c, c, ("bias", "residual")),
        ("c_fc", c, 4 * c, ("ln", "bias", "gelu")),
        ("mlp_proj", 4 * c, c, ("bias", "residual")),
        ("lm_head", c, vocab, ("ln",)),
    ]


def bench_cases(sweep: str) -> list[BenchCase]:
    """Every GEMV of a GPT-2 decode step (gpt2 and gpt2-xl widths) at batch 1, 4, 8, 16; tiny ones on CPU."""
    if sweep == "cpu":
        gemvs, batches, widths = _decode_gemvs(48, 500), (1, 7), (48,)
    else:
        widths = (768, 1600) if sweep == "full" else (768,)
        batches = (1, 4, 8, 16) if sweep == "full" else (1, 8)
        gemvs = None
    cases = []
    for c in widths:
        for name, k, n, flags in gemvs or _decode_gemvs(c):
            for m in batches:
                shape = _s(m, k, n, *flags)
                cases.append(BenchCase("fused_linear", shape, "m", f"{name} C={c}", target=m == 1 and c == 768))
    return cases


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read x, the weight (the bulk), bias, LayerNorm params and residual; write the output.  2·M·N·K FLOPs."""
    s = torch.empty((), dtype=dtype).element_size()
    m, k, n = shape["m"], shape["k"], shape["n"]
    elems = m * k + n * k + m * n
    elems += n if shape.get("bias") else 0
    elems += 2 * k if shape.get("ln") else 0
    elems += m * n if shape.get("residual") else 0
    return Traffic(s * elems, 2.0 * m * n * k)


def baselines(device: torch.device) -> dict:
    """PyTorch eager, op by op: ``F.layer_norm``, ``F.linear``, ``F.gelu(approximate="tanh")``, the add."""

    def torch_eager(inp: Inputs):
        x, w, b, lw, lb, eps, gelu, res = (inp[a] for a in ARGS)

        def run():
            h = x if lw is None else F.layer_norm(x, (x.shape[-1],), lw, lb, eps)
            y = F.linear(h, w, b)
            y = F.gelu(y, approximate="tanh") if gelu else y
            return y if res is None else res + y

        return run

    return {"torch": torch_eager}


register_op(OpSpec.from_module(__name__))
