"""``fused_mlp``: a pre-LN transformer block's whole MLP sublayer with its residual, for a decode step.

``x + c_proj(gelu(c_fc(LN(x))))``: the LayerNorm, c_fc with its bias, GPT-2's GELU, c_proj with its bias and the
residual add in one op (one launch on the kernel backends).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, seeded_randn
from gpt2fast.ops.specs.bias_gelu import gelu_tanh

ARGS = ("x", "ln_weight", "ln_bias", "eps", "fc_weight", "fc_bias", "proj_weight", "proj_bias")


def fused_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """``x + gelu(LN(x) @ fc_weight.T + fc_bias) @ proj_weight.T + proj_bias`` for ``x`` [M, C].

    ``ln_weight``/``ln_bias`` are [C], ``fc_weight`` [H, C] and ``fc_bias`` [H], ``proj_weight`` [C, H] and
    ``proj_bias`` [C] (``nn.Linear``'s layouts); returns the new residual stream [M, C].
    """
    validate(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias)
    args = (x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias)
    return dispatch("fused_mlp", backend, args, x.device)


def validate(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias) -> None:
    """The checks every backend relies on."""
    v.check_float("x", x)
    v.check_rank("x", x, 2, "[M, C]")
    v.check_nonempty("x", x)
    required = dict(ln_weight=ln_weight, ln_bias=ln_bias, fc_weight=fc_weight, fc_bias=fc_bias,
                    proj_weight=proj_weight, proj_bias=proj_bias)  # fmt: skip
    for name, t in required.items():
        v.check_float(name, t)
    v.check_rank("fc_weight", fc_weight, 2, "[H, C]")
    v.check_same("x", x, ln_weight=ln_weight, ln_bias=ln_bias, fc_weight=fc_weight, fc_bias=fc_bias,
                 proj_weight=proj_weight, proj_bias=proj_bias)  # fmt: skip
    c = x.shape[1]
    h = fc_weight.shape[0]
    if fc_weight.shape[1] != c:
        raise ValueError(f"fc_weight must have shape [H, {c}] (x has C = {c}), got {v.fmt(fc_weight.shape)}")
    v.check_nonempty("fc_weight", fc_weight)
    v.check_shape("ln_weight", ln_weight, (c,))
    v.check_shape("ln_bias", ln_bias, (c,))
    v.check_shape("fc_bias", fc_bias, (h,))
    v.check_shape("proj_weight", proj_weight, (c, h))
    v.check_shape("proj_bias", proj_bias, (c,))
    if not v.positive_finite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def reference(x, ln_weight, ln_bias, eps, fc_weight, fc_bias, proj_weight, proj_bias):
    """LayerNorm, c_fc, GELU, c_proj and the residual add, one after the other in the input dtype."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return x + F.linear(gelu_tanh(F.linear(h, fc_weight, fc_bias)), proj_weight, proj_bias)


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``m`` rows, width ``c``, MLP width ``h``; optional ``std`` of x.  Weights are N(0, 1/fan_in)."""
    randn = seeded_randn(gen, device, dtype)
    m, c, h = shape["m"], shape["c"], shape["h"]
    return dict(
        x=randn(m, c, std=shape.get("std", 1.0)),
        ln_weight=1 + randn(c, std=0.1),
        ln_bias=randn(c, std=0.1),
        eps=shape.get("eps", 1e-5),
        fc_weight=randn(h, c, std=c**-0.5),
        fc_bias=randn(h, std=0.1),
        proj_weight=randn(c, h, std=h**-0.5),
        proj_bias=randn(c, std=0.1),
    )


TEST_SHAPES = (
    dict(m=1, c=64, h=256),  # batch 1, a 4x MLP
    dict(m=1, c=1600, h=400),  # gpt2-xl's width
    dict(m=13, c=1600, h=200),  # batch 13 at gpt2-xl's width
    dict(m=16, c=48, h=192, std=10.0),  # batch 16
    dict(m=2, c=33, h=100),  # odd widths
    dict(m=1, c=100, h=37),  # an MLP narrower than one hidden block
)
GPU_SHAPES = (
    dict(m=1, c=768, h=3072),
    dict(m=8, c=768, h=3072),
    dict(m=16, c=768, h=3072),
    dict(m=1, c=1600, h=6400),
    dict(m=13, c=1600, h=6400),
)


def shape_strategy(size: int):
    """Hypothesis: up to 16 rows (sometimes 17-20), widths up to 200·size or a GPT-2 width, MLP widths up to
    600·size, x's scale varied."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        dict(
            m=st.one_of(st.integers(1, 16), st.integers(17, 20)),
            c=st.one_of(st.integers(1, 200 * size), st.sampled_from([768, 1600])),
            h=st.integers(1, 600 * size),
            std=st.sampled_from([0.1, 1.0, 10.0]),
        )
    )


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(m=3, c=32, h=64, device="cpu", **over) -> Inputs:
    kw = dict(x=_rn(m, c, device=device), ln_weight=_rn(c, device=device), ln_bias=_rn(c, device=device), eps=1e-5,
              fc_weight=_rn(h, c, device=device), fc_bias=_rn(h, device=device),
              proj_weight=_rn(c, h, device=device), proj_bias=_rn(c, device=device))  # fmt: skip
    kw.update(over)
    return kw


BAD_INPUTS = (
    BadInput("mlp-x-rank", "x 3-D", lambda: _args(x=_rn(1, 3, 32)),
             ValueError, r"x must be 2-D \[M, C\], got shape \[1, 3, 32\]"),
    BadInput("mlp-x-empty", "x [0, 32]", lambda: _args(x=_rn(0, 32)),
             ValueError, r"x is empty \(shape \[0, 32\]\); every dimension must be >= 1"),
    BadInput("mlp-fc-c", "fc_weight [64, 31] for C = 32", lambda: _args(fc_weight=_rn(64, 31)),
             ValueError, r"fc_weight must have shape \[H, 32\] \(x has C = 32\), got \[64, 31\]"),
    BadInput("mlp-proj-shape", "proj_weight [32, 63] for H = 64", lambda: _args(proj_weight=_rn(32, 63)),
             ValueError, r"proj_weight must have shape \[32, 64\], got \[32, 63\]"),
    BadInput("mlp-fc-bias", "fc_bias [32] for H = 64", lambda: _args(fc_bias=_rn(32)),
             ValueError, r"fc_bias must have shape \[64\], got \[32\]"),
    BadInput("mlp-ln-len", "ln_weight [31]", lambda: _args(ln_weight=_rn(31)),
             ValueError, r"ln_weight must have shape \[32\], got \[31\]"),
    BadInput("mlp-proj-bias-none", "proj_bias None", lambda: _args(proj_bias=None),
             TypeError, r"proj_bias must be a torch\.Tensor, got NoneType"),
    BadInput("mlp-eps-zero", "eps=0", lambda: _args(eps=0.0),
             ValueError, r"eps must be a positive finite number, got 0\.0"),
    BadInput("mlp-mixed-dtype", "proj_weight bf16 with x fp32",
             lambda: _args(proj_weight=_rn(32, 64, dtype=torch.bfloat16)),
             TypeError, r"proj_weight has dtype torch\.bfloat16 but x has torch\.float32; they must match"),
    BadInput("mlp-other-device", "fc_bias on another device (meta)", lambda: _args(fc_bias=_rn(64, device="meta")),
             RuntimeError, r"fc_bias is on meta but x is on cpu; move them to one device"),
    BadInput("mlp-eps-inf", "eps=inf", lambda: _args(eps=math.inf),
             ValueError, r"eps must be a positive finite number, got inf"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("mlp-17-rows", "17 rows (more than a decode step's 16)", lambda d: _args(m=17, device=d)),
    EdgeInput("mlp-fc-transposed", "fc_weight a transposed [C, H] view",
              lambda d: _args(fc_weight=_rn(32, 64, device=d).t(), device=d)),
    EdgeInput("mlp-proj-transposed", "proj_weight a transposed [H, C] view",
              lambda d: _args(proj_weight=_rn(64, 32, device=d).t(), device=d)),
    EdgeInput("mlp-x-strided", "x[:, ::2] (last-dim stride 2)",
              lambda d: _args(x=_rn(3, 64, device=d)[:, ::2], device=d)),
)  # fmt: skip


# ---- benchmarks ---------------------------------------------------------------------------------------------
def bench_cases(sweep: str) -> list[BenchCase]:
    """GPT-2 small's and xl's MLP at batch 1..16; a tiny one on CPU."""
    if sweep == "cpu":
        return [BenchCase("fused_mlp", dict(m=m, c=48, h=192), "m", "C=48") for m in (1, 7)]
    widths = (768, 1600) if sweep == "full" else (768,)
    batches = (1, 4, 8, 16) if sweep == "full" else (1, 8)
    return [
        BenchCase("fused_mlp", dict(m=m, c=c, h=4 * c), "m", f"C={c}", target=m == 1 and c == 768)
        for c in widths
        for m in batches
    ]


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read x, both weights (the bulk), the biases and LayerNorm params; write the output.  4·M·C·H FLOPs."""
    s = torch.empty((), dtype=dtype).element_size()
    m, c, h = shape["m"], shape["c"], shape["h"]
    return Traffic(s * (2 * m * c + 2 * c * h + h + 3 * c), 4.0 * m * c * h)


def baselines(device: torch.device) -> dict:
    """PyTorch eager, op by op (``F.layer_norm``, ``F.linear``, ``F.gelu(approximate="tanh")``, ``F.linear``, add)."""

    def torch_eager(inp: Inputs):
        x, lw, lb, eps, fw, fb, pw, pb = (inp[a] for a in ARGS)
        return lambda: x + F.linear(F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), lw, lb, eps), fw, fb),
                                           approximate="tanh"), pw, pb)  # fmt: skip

    return {"torch": torch_eager}


register_op(OpSpec.from_module(__name__))
