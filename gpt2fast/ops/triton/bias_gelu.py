"""Fused bias add + GELU (tanh approximation, GPT-2's "gelu_new") as a Triton kernel.

A 2-D grid: one program per (row, block of columns), so the bias is read by column index
without a modulo.  The math is in fp32; the result is stored in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpt2fast.ops._registry import register_impl
from gpt2fast.ops.specs import bias_gelu_backward as backward_spec
from gpt2fast.ops.triton._common import TL_DTYPE, CompileCase, gelu_tanh, launch, signature
from gpt2fast.ops.triton._tuning import BIAS_GELU_CONFIGS, bias_gelu_heuristic


@triton.jit
def _bias_gelu_kernel(X, Bias, Y, N, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    u = tl.load(X + row + cols, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(Bias + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row + cols, gelu_tanh(u).to(Y.dtype.element_ty), mask=mask)


_bias_gelu_tuned = triton.autotune(configs=BIAS_GELU_CONFIGS, key=["N"])(_bias_gelu_kernel)


@torch.library.custom_op("gpt2fast_triton::bias_gelu", mutates_args=())
def bias_gelu_op(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias) over the last dim (contiguous output)."""
    n = x.shape[-1]
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grid = lambda meta: (x.numel() // n, triton.cdiv(n, meta["BLOCK_N"]))
    launch(_bias_gelu_kernel, _bias_gelu_tuned, grid, (x, bias.contiguous(), y, n), {}, bias_gelu_heuristic(n))
    return y


@bias_gelu_op.register_fake
def _(x, bias):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


backward_spec.register_autograd(bias_gelu_op, "triton")


@register_impl("bias_gelu", "triton", differentiable=True)
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias), fused in one kernel; differentiable (its backward: ``bias_gelu_backward``)."""
    return bias_gelu_op(x, bias)


def compile_cases(full: bool = False, arch: int = 90) -> list[CompileCase]:
    """Every config (block x warps) for fp16, the heuristic one for fp32/bf16 (all if ``full``); the same
    on every target ``arch`` (no config spills).  The kernel does not specialise on N."""
    cases = []
    heur = bias_gelu_heuristic(4 * 768)
    for tname in TL_DTYPE.values():
        ptr = "*" + tname
        for cfg in BIAS_GELU_CONFIGS if full or tname == "fp16" else [heur]:
            consts = dict(cfg.kwargs)
            sig = signature(_bias_gelu_kernel, dict(X=ptr, Bias=ptr, Y=ptr, N="i32"), consts)
            is_heur = cfg.kwargs == heur.kwargs and cfg.num_warps == heur.num_warps
            label = f"{tname} BLOCK_N={cfg.kwargs['BLOCK_N']} warps={cfg.num_warps}"
            cases.append(CompileCase("bias_gelu", _bias_gelu_kernel, sig, consts, cfg.num_warps, 1, label, is_heur))
    return cases
