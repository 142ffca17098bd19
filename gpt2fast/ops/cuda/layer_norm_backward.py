"""The backward of LayerNorm (+ residual) through ``_C.layer_norm_backward`` (``csrc/layer_norm_backward.cu``).

Rows of ``grad_y``, ``h`` and ``grad_h`` are read through one row stride each (no copies for [..., N] tensors that
view as [rows, N]); ``weight`` must be contiguous; rows up to :data:`MAX_N` (the kernel holds a row's columns in
registers, 8 per thread).  The partial column sums go to an fp32 workspace of one row per block, summed by a
second kernel: no atomics.
"""

from __future__ import annotations

import torch

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.cuda import _ext

#: Widest row the kernel takes (512 threads x 8 columns).
MAX_N = 4096


def supports(grad_y, h, weight, eps, grad_h) -> str | None:
    """Rows of ``h`` with one row stride, a contiguous ``weight``, N <= :data:`MAX_N`, an ``eps`` fp32 represents.
    (Gradients in other layouts, e.g. the expanded gradient of a ``.sum()``, are copied: see :func:`rows`.)"""
    n = h.shape[-1]
    if n > MAX_N:
        return f"cuda backend: layer_norm_backward rows must have N <= {MAX_N}, got {n}"
    return (
        _ext.dtype_reason("h", h)
        or _ext.rows_reason("h", h)
        or _ext.contiguous_1d_reason("weight", weight)
        or _ext.fp32_param_reason("eps", float(eps))
    )


def rows(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as it is when it views as [rows, N] with one row stride, else a contiguous copy (a gradient arriving
    expanded or transposed)."""
    return t if t is None or _ext.rows_reason("t", t) is None else t.contiguous()


@torch.library.custom_op("gpt2fast::cuda_layer_norm_backward", mutates_args=())
def layer_norm_backward_op(
    grad_y: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float, grad_h: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dh, dweight, dbias)``; ``dh`` (contiguous) includes ``grad_h`` when given."""
    device = _ext.check_device(grad_y=grad_y, h=h, weight=weight, grad_h=grad_h)
    g2, gs = _ext.rows_view("grad_y", grad_y)
    h2, hs = _ext.rows_view("h", h)
    r2, rs = (None, 0) if grad_h is None else _ext.rows_view("grad_h", grad_h)
    rows, n = h2.shape
    dh, dweight, dbias = _ext.new_like(h), _ext.new_like(weight), _ext.new_like(weight)
    programs = _ext.partial_programs(rows, device)
    partial = torch.empty((programs, 2 * n), dtype=torch.float32, device=h.device)
    tensors = dict(grad_y=g2, h=h2, weight=weight, grad_h=r2, dh=dh, dweight=dweight, dbias=dbias, partial=partial)
    strides = dict(grad_y_row_stride=gs, h_row_stride=hs, grad_h_row_stride=rs)
    _ext.launch("layer_norm_backward", device, h, tensors, **strides, programs=programs, rows=rows, n=n, eps=eps)
    return dh, dweight, dbias


@layer_norm_backward_op.register_fake
def _(grad_y, h, weight, eps, grad_h):
    return _ext.new_like(h), _ext.new_like(weight), _ext.new_like(weight)


@register_impl("layer_norm_backward", "cuda", supports=supports)
def layer_norm_backward(grad_y, h, weight, eps, grad_h):
    """``(dh, dweight, dbias)``: one kernel over the rows, one over the partial column sums."""
    return tuple(layer_norm_backward_op(rows(grad_y), h, weight, float(eps), rows(grad_h)))
