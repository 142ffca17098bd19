"""Fused linear cross-entropy: torch matmuls per chunk of rows around one Triton kernel per chunk.

The chunk loop, the matmuls and the fp32 ``grad_weight`` accumulation are the spec's
(:func:`~gpt2fast.ops.specs.linear_cross_entropy.chunked_loss`, shared with the reference); this backend's step is
``_cross_entropy_chunk_kernel``: one program per row of the chunk's logits (in the input dtype, never an fp32 copy)
makes an online max / sum pass over the vocabulary in fp32 (its log-sum-exp), writes the row's loss (0 for an
ignored label, NaN for an out-of-range one), and, when a gradient is needed, a second pass overwrites the logits in
place with their gradient ``(softmax - onehot(label)) * scale``.  So a chunk costs one buffer of logits, reused as
its gradient, and nothing of the size of the full logits is ever allocated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._autograd import needs_grad
from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.specs import linear_cross_entropy as spec
from gpt2fast.ops.triton._common import TL_DTYPE, CompileCase, launch, signature
from gpt2fast.ops.triton._tuning import cross_entropy_heuristic


@triton.jit
def _cross_entropy_chunk_kernel(
    Logits, stride_row, Labels, Losses, Scale, V, ignore_index, HAS_GRAD: tl.constexpr, BLOCK_V: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    base = Logits + row * stride_row
    label = tl.load(Labels + row).to(tl.int64)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    s = tl.full([], 0.0, dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    lse = m + tl.log(s)
    ignored = label == ignore_index
    bad = ((label < 0) | (label >= V)) & (label != ignore_index)
    target = tl.where(ignored | bad, 0, label)
    picked = tl.load(base + target).to(tl.float32)
    loss = tl.where(ignored, 0.0, lse - picked)
    tl.store(Losses + row, tl.where(bad, float("nan"), loss))
    if HAS_GRAD:
        scale = tl.load(Scale)
        w = tl.where(bad, float("nan"), tl.where(ignored, 0.0, scale))
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * w
            tl.store(base + cols, g.to(Logits.dtype.element_ty), mask=cols < V)


def triton_step(logits, labels, losses, ignore_index: int, scale):
    """The per-chunk step of :func:`~gpt2fast.ops.specs.linear_cross_entropy.chunked_loss` (see the module
    docstring): returns the chunk's logits buffer, overwritten with their gradient, or None."""
    rows, vocab = logits.shape
    has_grad = scale is not None
    args = (logits, logits.stride(0), labels.contiguous(), losses, scale if has_grad else losses, vocab, ignore_index)
    launch(_cross_entropy_chunk_kernel, None, (rows,), args, dict(HAS_GRAD=has_grad), cross_entropy_heuristic(vocab))
    return logits if has_grad else None


@torch.library.custom_op("gpt2fast_triton::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    reduction: str,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad_hidden, grad_weight)``: the gradients of the loss itself (empty when not needed)."""
    loss, gh, gw = spec.chunked_loss(
        hidden, weight, labels, ignore_index, reduction, need_hidden, need_weight, triton_step
    )
    return loss, hidden.new_empty(0) if gh is None else gh, weight.new_empty(0) if gw is None else gw


@linear_cross_entropy_op.register_fake
def _(hidden, weight, labels, ignore_index, reduction, need_hidden, need_weight):
    loss = hidden.new_empty((), dtype=torch.float32)
    gh = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else weight.new_empty(0)
    return loss, gh, gw


def _setup(ctx, inputs, output):
    _loss, gh, gw = output
    need_hidden, need_weight = inputs[5], inputs[6]
    ctx.save_for_backward(gh if need_hidden else None, gw if need_weight else None)
    ctx.mark_non_differentiable(gh, gw)


def _backward(ctx, grad_loss, _grad_gh, _grad_gw):
    return (*spec.scale_saved_grads(grad_loss, *ctx.saved_tensors), None, None, None, None, None)


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup)


@register_impl("linear_cross_entropy", "triton", differentiable=True)
def linear_cross_entropy(hidden, weight, labels, ignore_index, reduction):
    """The chunked loss with the Triton softmax / loss / gradient kernel; the gradients (computed chunk by chunk
    in the forward) only when ``hidden`` or ``weight`` requires grad."""
    need_hidden, need_weight = needs_grad(hidden), needs_grad(weight)
    return linear_cross_entropy_op(hidden, weight, labels, ignore_index, reduction, need_hidden, need_weight)[0]


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """The heuristic config (the only one launched) for every dtype with int64 labels and the gradient pass, fp16
    also with int32 labels and without the gradient pass; ``full``: every combination.  The same on every
    target."""
    cases = []
    for tname in TL_DTYPE.values():
        for label_type in ("*i64", "*i32"):
            for has_grad in (True, False):
                if not (full or (label_type == "*i64" and has_grad) or tname == "fp16"):
                    continue
                cfg = cross_entropy_heuristic(50257)
                consts = dict(HAS_GRAD=has_grad, **cfg.kwargs)
                types = dict(Logits="*" + tname, stride_row="i32", Labels=label_type, Losses="*fp32", Scale="*fp32")
                types.update(V="i32", ignore_index="i32")
                sig = signature(_cross_entropy_chunk_kernel, types, consts)
                label = f"{tname} labels={label_type[1:]} grad={int(has_grad)} BLOCK_V={cfg.kwargs['BLOCK_V']}"
                cases.append(CompileCase("cross_entropy", _cross_entropy_chunk_kernel, sig, consts,
                                         cfg.num_warps, 1, label, True))  # fmt: skip
    return cases
