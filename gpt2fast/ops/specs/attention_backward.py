"""``attention_backward``: the gradients of ``attention`` (``dq``, ``dk``, ``dv``), FlashAttention-2 style.

Given the forward's output ``out`` and its per-row log-sum-exp ``lse`` (fp32 [B, H, T], natural log, of the
scaled and masked scores: ``lse[b, h, i] = log sum_j exp(scale * q_i . k_j)``), a backend recomputes each tile of
probabilities ``P = exp(scale * q k^T - lse)`` and never holds the T x T matrix.  A differentiable attention
forward saves ``out`` and ``lse`` (only when a gradient is needed) and its backward calls this op.
"""

from __future__ import annotations

import torch

from gpt2fast.ops import _validate as v
from gpt2fast.ops._autograd import run_backward
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, View, seeded_randn
from gpt2fast.ops.specs import attention as fwd

ARGS = ("grad_out", "q", "k", "v", "out", "lse", "causal", "scale")


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of ``out = attention(q, k, v, causal, scale)`` given ``grad_out`` ([B, H, T, D]
    tensors of any strides), the forward's ``out`` and its fp32 log-sum-exp ``lse`` [B, H, T] (natural log)."""
    validate(grad_out, q, k, v, out, lse, causal, scale)
    return dispatch("attention_backward", backend, (grad_out, q, k, v, out, lse, causal, scale), q.device)


def validate(grad_out, q, k, v_, out, lse, causal, scale) -> None:
    """The checks every backend relies on (the forward's, plus grad_out, out and lse)."""
    fwd.validate(q, k, v_, causal, scale)
    v.check_same("q", q, grad_out=grad_out, out=out)
    v.check_shape("grad_out", grad_out, tuple(q.shape))
    v.check_shape("out", out, tuple(q.shape))
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32:
        got = lse.dtype if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise TypeError(f"lse must be a float32 tensor (the forward's log-sum-exp), got {got}")
    if lse.device != q.device:
        raise RuntimeError(f"lse is on {lse.device} but q is on {q.device}; move them to one device")
    v.check_shape("lse", lse, tuple(q.shape[:3]))


def scores(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """The scaled (and causally masked) scores [B, H, T, T] in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        t = q.shape[-2]
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return s


def lse_of(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None) -> torch.Tensor:
    """The log-sum-exp a forward saves: fp32 [B, H, T], natural log of the scaled, masked scores."""
    return torch.logsumexp(scores(q.float(), k.float(), causal, scale), dim=-1)


def reference(grad_out, q, k, v, out, lse, causal=True, scale=None):
    """The op's formulas in plain PyTorch from the given ``out`` and ``lse``: ``P = exp(scale·q·kᵀ - lse)``,
    ``delta = rowsum(grad_out ∘ out)``, ``dS = P ∘ (grad_out·vᵀ - delta)``, ``dq = scale·dS·k``, ``dk = scale·dSᵀ·q``,
    ``dv = Pᵀ·grad_out``.  Matmuls in the input dtype, the elementwise softmax terms in fp32 (as the kernels and
    PyTorch's own half-precision softmax backward keep them), the T x T matrices materialised.

    ``delta`` comes from ``out`` as given (rounded to the input dtype by the forward), as in FlashAttention-2: with a
    very peaked softmax (large ``scale·|q|·|k|``) that rounding dominates the error of dk and dq; the gradient of
    the ``attention`` op itself is checked against autograd through its reference (test_ops_conformance)."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = torch.exp(scores(q, k, causal, scale).float() - lse[..., None])
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True)
    ds = p * (torch.matmul(grad_out, v.transpose(-1, -2)).float() - delta)
    ds_low, p_low = ds.to(dtype), p.to(dtype)
    dq = torch.matmul(ds_low, k) * scale
    dk = torch.matmul(ds_low.transpose(-1, -2), q) * scale
    return dq, dk, torch.matmul(p_low.transpose(-1, -2), grad_out)


def register_autograd(op, backend: str) -> None:
    """Make a backend's training forward ``op(q, k, v, causal, scale) -> (out, lse)`` differentiable: it saves
    q, k, v, out and lse and runs this op in its backward, on ``backend`` where it can (see
    :func:`gpt2fast.ops._autograd.run_backward`).  ``lse`` is an output no gradient flows through."""

    def setup(ctx, inputs, output):
        q, k, v_, causal, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v_, out, lse)
        ctx.mark_non_differentiable(lse)
        ctx.causal, ctx.scale = causal, scale

    def backward(ctx, grad_out, _grad_lse):
        q, k, v_, out, lse = ctx.saved_tensors
        dq, dk, dv = run_backward("attention_backward", backend, grad_out, q, k, v_, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None

    op.register_autograd(backward, setup_context=setup)


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: as ``attention``'s (``batch``, ``heads``, ``seq``, ``head_dim``, ``causal``, ``scale``, ``std``);
    ``out`` and ``lse`` are the fp32 forward's (``out`` rounded to the dtype), ``grad_out`` is N(0, 1)."""
    inp = fwd.make_inputs(shape, dtype, device, gen)
    q, k, v_, causal, scale = (inp[a] for a in fwd.ARGS)
    out = fwd.reference(q.float(), k.float(), v_.float(), causal, scale).to(dtype)
    grad_out = seeded_randn(gen, device, dtype)(*q.shape)
    return dict(grad_out=grad_out, q=q, k=k, v=v_, out=out, lse=lse_of(q, k, causal, scale), causal=causal, scale=scale)


TEST_SHAPES = fwd.TEST_SHAPES  # the forward's odd shapes: T = 1, 33, 37, 70; D = 32, 64, 128; causal or not
GPU_SHAPES = tuple(
    dict(batch=b, heads=h, seq=t, head_dim=d)
    for b, h, t, d in [(8, 12, 1024, 64), (4, 25, 1000, 64), (2, 16, 1031, 128), (8, 12, 257, 32)]
)


def shape_strategy(size: int):
    """Hypothesis: as ``attention``'s, with H <= 2 and T up to 64·size."""
    return fwd.shape_strategy(size, max_heads=2, seq_per_size=64)


def _bthd(inputs: Inputs) -> Inputs:
    """Every [B, H, T, D] operand stored as [B, T, H, D] (the layout of the model's QKV views and gradients)."""
    return fwd.bthd(inputs, ("grad_out", "q", "k", "v", "out"))


VIEWS = (View("bthd", _bthd),)


def _args(shape=(1, 2, 5, 32), device="cpu", **over) -> Inputs:
    gen = torch.Generator().manual_seed(0)
    b, h, t, d = shape
    inp = make_inputs(dict(batch=b, heads=h, seq=t, head_dim=d), torch.float32, torch.device(device), gen)
    return {**inp, **over}


def _rn(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


BAD_INPUTS = (
    BadInput("attnb-lse-dtype", "lse float16", lambda: _args(lse=torch.zeros(1, 2, 5, dtype=torch.float16)),
             TypeError, r"lse must be a float32 tensor \(the forward's log-sum-exp\), got torch\.float16"),
    BadInput("attnb-lse-shape", "lse [1, 2, 6] for T = 5", lambda: _args(lse=torch.zeros(1, 2, 6)),
             ValueError, r"lse must have shape \[1, 2, 5\], got \[1, 2, 6\]"),
    BadInput("attnb-grad-shape", "grad_out with another T", lambda: _args(grad_out=_rn(1, 2, 6, 32)),
             ValueError, r"grad_out must have shape \[1, 2, 5, 32\], got \[1, 2, 6, 32\]"),
    BadInput("attnb-out-dtype", "out bf16 with q fp32", lambda: _args(out=_rn(1, 2, 5, 32, dtype=torch.bfloat16)),
             TypeError, r"out has dtype torch\.bfloat16 but q has torch\.float32; they must match"),
    BadInput("attnb-q-rank", "q 3-D", lambda: _args(q=_rn(2, 5, 32)),
             ValueError, r"q must be 4-D \[B, H, T, D\], got shape \[2, 5, 32\]"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("attnb-head-dim-48", "head dim 48", lambda d: _args(shape=(1, 2, 5, 48), device=d)),
    EdgeInput("attnb-head-dim-8", "head dim 8 (a tiny model)", lambda d: _args(shape=(2, 2, 9, 8), device=d)),
)


# ---- benchmarks ---------------------------------------------------------------------------------------------
def bench_cases(sweep: str) -> list[BenchCase]:
    """Causal backward at GPT-2's head dim 64 (12 and 25 heads), T from 128 to 8192."""
    if sweep == "full":
        seqs = [128, 256, 512, 1024, 2048, 4096, 8192]
        groups = [((8, 12), seqs), ((1, 25), seqs), ((4, 25), seqs)]
    elif sweep == "quick":
        groups = [((8, 12), [512, 1024, 2048]), ((1, 25), [4096])]
    else:
        groups = [((1, 2), [1, 17, 64])]
    return [
        BenchCase("attention_backward", dict(batch=b, heads=h, seq=t, head_dim=64), "seq", f"B={b} H={h}",
                  target=1024 <= t <= 4096)
        for (b, h), ts in groups for t in ts
    ]  # fmt: skip


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read grad_out, q, k, v, out and lse, write dq, dk, dv; 10·T²·D FLOPs per head (five T x T x D matmuls:
    the score and dP recomputations, dV, dQ, dK), half when causal."""
    b, h, t, d = shape["batch"], shape["heads"], shape["seq"], shape["head_dim"]
    s = torch.empty((), dtype=dtype).element_size()
    flops = 10.0 * b * h * t * t * d
    return Traffic(8 * b * h * t * d * s + 4 * b * h * t, flops / 2 if shape.get("causal", True) else flops)


#: Batch 0 and as many heads as keep the fp32 reference's score matrix under 1 GiB: the forward's check slice.
check_inputs, check_outputs = fwd.check_inputs, fwd.check_outputs


def baselines(device: torch.device) -> dict:
    """The backward of torch SDPA (its default kernel choice; a retained graph, so only the backward is timed)."""
    import torch.nn.functional as F

    def sdpa(inp: Inputs):
        leaves = [inp[n].detach().requires_grad_(True) for n in ("q", "k", "v")]
        o = F.scaled_dot_product_attention(*leaves, is_causal=inp["causal"], scale=inp["scale"])
        return lambda: torch.autograd.grad(o, leaves, inp["grad_out"], retain_graph=True)

    return {"torch.sdpa": sdpa}


register_op(OpSpec.from_module(__name__))
