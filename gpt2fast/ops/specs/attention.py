"""``attention``: scaled dot-product attention over ``[B, H, T, D]`` (the prefill / training path)."""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from gpt2fast.ops import _validate as v
from gpt2fast.ops._registry import dispatch, register_op
from gpt2fast.ops._spec import BadInput, BenchCase, EdgeInput, Inputs, OpSpec, Traffic, View, seeded_randn

ARGS = ("q", "k", "v", "causal", "scale")
GRAD_ARGS = ("q", "k", "v")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention over ``[B, H, T, D]`` tensors of any strides; returns ``[B, H, T, D]``.

    ``scale`` defaults to ``D ** -0.5``.
    """
    validate(q, k, v, causal, scale)
    return dispatch("attention", backend, (q, k, v, causal, scale), q.device)


def validate(q, k, v_, causal, scale) -> None:
    """The checks every backend relies on."""
    v.check_float("q", q)
    v.check_rank("q", q, 4, "[B, H, T, D]")
    v.check_nonempty("q", q)
    v.check_same("q", q, k=k, v=v_)
    v.check_shape("k", k, tuple(q.shape))
    v.check_shape("v", v_, tuple(q.shape))
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    v.check_scale(scale)


def reference(q, k, v, causal=True, scale=None):
    """softmax(q·kᵀ·scale [+ causal mask])·v, in the input dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        t = q.shape[-2]
        mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


# ---- inputs and test shapes ---------------------------------------------------------------------------------
def make_inputs(shape: dict, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> Inputs:
    """``shape``: ``batch``, ``heads``, ``seq``, ``head_dim``; optional ``causal`` (True), ``scale``, ``std``."""
    randn = seeded_randn(gen, device, dtype)
    dims = (shape["batch"], shape["heads"], shape["seq"], shape["head_dim"])
    std = shape.get("std", 1.0)
    q, k, v_ = (randn(*dims, std=std) for _ in range(3))
    return dict(q=q, k=k, v=v_, causal=shape.get("causal", True), scale=shape.get("scale"))


TEST_SHAPES = (
    *(
        dict(batch=b, heads=h, seq=t, head_dim=d, causal=c)
        for b, h, t, d in [(1, 1, 1, 64), (1, 2, 70, 64), (2, 1, 33, 32), (1, 1, 40, 128)]
        for c in (True, False)
    ),
    dict(batch=1, heads=3, seq=37, head_dim=64, scale=0.3),
)
GPU_SHAPES = tuple(
    dict(batch=b, heads=h, seq=t, head_dim=d)
    for b, h, t, d in [(1, 12, 4096, 64), (4, 25, 1000, 64), (2, 16, 1031, 128), (8, 12, 257, 32), (4096, 17, 16, 32)]
)


def shape_strategy(size: int, max_heads: int | None = None, seq_per_size: int = 160):
    """Hypothesis: B <= 2, H <= ``max_heads`` (2·size), T up to ``seq_per_size``·size, every supported head dim,
    causal or not, a scale (the backward's strategy too, with fewer heads and shorter sequences)."""
    from hypothesis import strategies as st

    return st.fixed_dictionaries(
        dict(
            batch=st.integers(1, 2),
            heads=st.integers(1, max_heads or 2 * size),
            seq=st.integers(1, seq_per_size * size),
            head_dim=st.sampled_from([32, 64, 128]),
            causal=st.booleans(),
            scale=st.one_of(st.none(), st.floats(0.02, 1.0)),
        )
    )


def bthd(inputs: Inputs, names: tuple[str, ...] = ("q", "k", "v")) -> Inputs:
    """The ``names`` operands as a QKV projection produces them: [B, T, H, D] storage viewed as [B, H, T, D]
    (no copy)."""
    out = dict(inputs)
    for name in names:
        out[name] = inputs[name].transpose(1, 2).contiguous().transpose(1, 2)
    return out


def _qkv(inputs: Inputs) -> Inputs:
    """q, k and v as three slices of one [B, T, 3, H, D] tensor, transposed to [B, H, T, D]."""
    qkv = torch.stack([inputs[n].transpose(1, 2) for n in ("q", "k", "v")], dim=2)  # [B, T, 3, H, D]
    q_, k_, v_ = (x.transpose(1, 2) for x in qkv.unbind(2))  # [B, H, T, D] views
    return dict(inputs, q=q_, k=k_, v=v_)


def _rn(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=device)


def _args(q=None, k=None, v=None, causal=True, scale=None, shape=(1, 2, 5, 32), device="cpu") -> Inputs:
    q = _rn(*shape, device=device) if q is None else q
    k = _rn(*q.shape, device=device) if k is None else k
    v = _rn(*q.shape, device=device) if v is None else v
    return dict(q=q, k=k, v=v, causal=causal, scale=scale)


BAD_INPUTS = (
    BadInput("attn-rank3", "q 3-D", lambda: _args(q=_rn(2, 5, 32)),
             ValueError, r"q must be 4-D \[B, H, T, D\], got shape \[2, 5, 32\]"),
    BadInput("attn-k-shape", "k with a different T", lambda: _args(k=_rn(1, 2, 6, 32)),
             ValueError, r"k must have shape \[1, 2, 5, 32\], got \[1, 2, 6, 32\]"),
    BadInput("attn-mixed-dtype", "v fp16 with q/k fp32", lambda: _args(v=_rn(1, 2, 5, 32, dtype=torch.float16)),
             TypeError, r"v has dtype torch\.float16 but q has torch\.float32; they must match"),
    BadInput("attn-other-device", "k on another device (meta)", lambda: _args(k=_rn(1, 2, 5, 32, device="meta")),
             RuntimeError, r"k is on meta but q is on cpu; move them to one device"),
    BadInput("attn-batch0", "batch of 0", lambda: _args(shape=(0, 2, 5, 32)),
             ValueError, r"q is empty \(shape \[0, 2, 5, 32\]\); every dimension must be >= 1"),
    BadInput("attn-causal-int", "causal=1", lambda: _args(causal=1),
             TypeError, r"causal must be a bool, got int"),
    BadInput("attn-scale-neg", "scale=-0.1", lambda: _args(scale=-0.1),
             ValueError, r"scale must be None or a positive finite number, got -0\.1"),
    BadInput("attn-scale-inf", "scale=inf (gave NaN before)", lambda: _args(scale=math.inf),
             ValueError, r"scale must be None or a positive finite number, got inf"),
    BadInput("attn-int", "q int64", lambda: _args(q=torch.ones(1, 2, 5, 32, dtype=torch.int64)),
             TypeError, r"q must be float32, float16 or bfloat16, got torch\.int64"),
)  # fmt: skip

EDGE_INPUTS = (
    EdgeInput("attn-head-dim-48", "head dim 48", lambda d: _args(shape=(1, 2, 5, 48), device=d)),
    EdgeInput("attn-head-dim-8", "head dim 8 (a tiny model)", lambda d: _args(shape=(2, 2, 9, 8), device=d)),
    EdgeInput("attn-bthd-view", "q/k/v [B, T, H, D] tensors transposed to [B, H, T, D] (no copy)",
              lambda d: _args(*(_rn(2, 7, 3, 32, device=d).transpose(1, 2) for _ in range(3)))),
    EdgeInput("attn-strided-last-dim", "q[..., ::2] (last-dim stride 2)",
              lambda d: _args(q=_rn(1, 2, 5, 64, device=d)[..., ::2], device=d)),
)  # fmt: skip

VIEWS = (View("bthd", bthd), View("qkv-slices", _qkv))


# ---- benchmarks ---------------------------------------------------------------------------------------------
def bench_cases(sweep: str) -> list[BenchCase]:
    """Causal prefill at GPT-2's head dim 64 (12 heads like gpt2, 25 like gpt2-xl), T from 128 to 8192."""
    if sweep == "full":
        seqs = [128, 256, 512, 1024, 2048, 4096, 8192]
        groups = [((1, 12), seqs), ((4, 12), seqs), ((1, 25), seqs), ((4, 25), seqs)]
    elif sweep == "quick":
        groups = [((4, 12), [256, 1024, 2048, 4096, 8192]), ((1, 25), [1024, 4096])]
    else:
        groups = [((1, 2), [1, 17, 64])]
    return [
        BenchCase("attention", dict(batch=b, heads=h, seq=t, head_dim=64), "seq", f"B={b} H={h}",
                  target=1024 <= t <= 4096)
        for (b, h), ts in groups for t in ts
    ]  # fmt: skip


def traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    """Read q, k, v and write o; 4·T²·D FLOPs per head (half when causal)."""
    b, h, t, d = shape["batch"], shape["heads"], shape["seq"], shape["head_dim"]
    s = torch.empty((), dtype=dtype).element_size()
    flops = 4.0 * b * h * t * t * d
    return Traffic(4 * b * h * t * d * s, flops / 2 if shape.get("causal", True) else flops)


def _check_heads(shape: dict) -> int:
    t = shape["seq"]
    return max(1, min(shape["heads"], (1 << 28) // (t * t)))  # keeps the fp32 score matrix under 1 GiB


def check_inputs(shape: dict, inputs: Inputs) -> Inputs:
    """Batch 0 and as many heads as keep the fp32 reference's score matrix under 1 GiB."""
    h = _check_heads(shape)
    return {k: (t[:1, :h] if isinstance(t, torch.Tensor) else t) for k, t in inputs.items()}


def check_outputs(shape: dict, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same batch and heads."""
    return [o[:1, : _check_heads(shape)] for o in outputs]


def baselines(device: torch.device) -> dict:
    """torch SDPA (its default choice, and on CUDA each of its kernels), and flash_attn when installed."""

    def sdpa(kernel: str | None):
        def make(inp: Inputs):
            q, k, v_, causal, scale = (inp[a] for a in ARGS)
            if kernel is None:
                return lambda: F.scaled_dot_product_attention(q, k, v_, is_causal=causal, scale=scale)
            from torch.nn.attention import SDPBackend, sdpa_kernel

            be = getattr(SDPBackend, kernel)

            def run():
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v_, is_causal=causal, scale=scale)

            return run

        return make

    def flash_attn(inp: Inputs):
        from flash_attn import flash_attn_func

        q, k, v_ = (inp[n].transpose(1, 2).contiguous() for n in ("q", "k", "v"))  # [B, T, H, D]
        return lambda: flash_attn_func(q, k, v_, causal=inp["causal"], softmax_scale=inp["scale"]).transpose(1, 2)

    out: dict = {"torch.sdpa": sdpa(None)}
    if device.type == "cuda":
        for kernel in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            out["torch.sdpa:" + kernel.split("_")[0].lower()] = sdpa(kernel)
        if importlib.util.find_spec("flash_attn") is not None:
            out["flash_attn"] = flash_attn
    return out


register_op(OpSpec.from_module(__name__))
