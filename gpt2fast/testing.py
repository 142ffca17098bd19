"""The one tolerance rule every parity check in gpt2fast uses (tests, CLI, benchmarks).

FlashAttention's rule: a low-precision result ``out`` passes when

    max|out - ref_fp32| <= 2 * max|baseline - ref_fp32| + eps

where ``ref_fp32`` is the computation in fp32 and ``baseline`` is plain PyTorch's
own result in ``out``'s dtype.  In fp32 the baseline error is ~0 and ``eps`` alone
decides.  ``eps`` is absolute, scaled by ``max(1, max|ref_fp32|)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Default epsilon of the rule per dtype (absolute, times max(1, max|ref|)).
EPS: dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass(frozen=True)
class ParityResult:
    """Outcome of one comparison under the FlashAttention rule."""

    err: float  # max|out - ref_fp32|
    baseline_err: float  # max|baseline - ref_fp32|
    bound: float  # 2 * baseline_err + eps
    ok: bool

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAIL"
        return f"{verdict}: err={self.err:.3e} bound={self.bound:.3e} (baseline err={self.baseline_err:.3e})"


def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def fa_check(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    baseline: torch.Tensor | None = None,
    eps: float | None = None,
) -> ParityResult:
    """Compare ``out`` with ``ref_fp32`` under the FlashAttention rule.

    ``baseline`` defaults to ``ref_fp32`` cast to ``out.dtype`` and back (rounding error only).
    NaN or inf anywhere in ``out`` always fails.
    """
    ref = ref_fp32.float()
    if baseline is None:
        baseline = ref.to(out.dtype)
    if eps is None:
        eps = EPS.get(out.dtype, 1e-4)
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    err = _maxabs(out.float(), ref)
    base = _maxabs(baseline.float(), ref)
    bound = 2.0 * base + eps * scale
    ok = bool(torch.isfinite(out).all()) and err <= bound
    return ParityResult(err, base, bound, ok)


def assert_fa_close(
    out: torch.Tensor,
    ref_fp32: torch.Tensor,
    baseline: torch.Tensor | None = None,
    eps: float | None = None,
    msg: str = "",
) -> ParityResult:
    """Assert :func:`fa_check` passes; the message carries the figures and ``msg``."""
    res = fa_check(out, ref_fp32, baseline, eps)
    assert res.ok, f"{msg} {res} dtype={out.dtype} shape={tuple(out.shape)}"
    return res
