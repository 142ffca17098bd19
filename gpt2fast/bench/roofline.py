"""Byte and FLOP counts of each op, and the device peaks they are measured against.

The peaks are *measured in the same run*, never taken from a datasheet: the
achieved bandwidth of a large device-to-device copy (bytes read + bytes written
over time) and the throughput of a large bf16 matmul.  A kernel's "% of copy
bandwidth" is then its achieved GB/s over what ``Tensor.copy_`` gets on the same
device at the same moment.

Byte counts are the minimum traffic of an ideal kernel: every input read once,
every output written once, nothing else (no statistics written, no re-reads).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from gpt2fast.bench.timing import Timing, time_call
from gpt2fast.config import GPT2Config


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


# ---- per-op traffic ----------------------------------------------------------------------
def layer_norm_bytes(rows: int, n: int, dtype: torch.dtype, residual: bool) -> int:
    """LayerNorm over ``rows`` x ``n``: read x (and residual), weight, bias; write y (and h = x + residual)."""
    s = itemsize(dtype)
    tensors = 4 if residual else 2  # x, residual, y, h  |  x, y
    return s * (tensors * rows * n + 2 * n)


def bias_gelu_bytes(rows: int, n: int, dtype: torch.dtype) -> int:
    """gelu(x + bias) over ``rows`` x ``n``: read x and bias, write y."""
    s = itemsize(dtype)
    return s * (2 * rows * n + n)


def attention_bytes(b: int, h: int, t: int, d: int, dtype: torch.dtype) -> int:
    """Prefill attention: read q, k, v and write o, each [B, H, T, D]."""
    return 4 * b * h * t * d * itemsize(dtype)


def attention_flops(b: int, h: int, t: int, d: int, causal: bool) -> float:
    """Matmul FLOPs of attention: 2·T·T·D for QKᵀ plus 2·T·T·D for PV per head; causal does half."""
    flops = 4.0 * b * h * t * t * d
    return flops / 2 if causal else flops


def decode_kv_bytes(h: int, d: int, seqlens: Sequence[int], dtype: torch.dtype) -> int:
    """Cached keys and values one decode step must read: 2·H·D per cached position."""
    return 2 * h * d * int(sum(seqlens)) * itemsize(dtype)


def decode_attention_bytes(h: int, d: int, seqlens: Sequence[int], dtype: torch.dtype, append: bool) -> int:
    """One decode-attention call: read q and the cached K/V, write the output; with ``append``
    also read k_new/v_new and write them into the cache."""
    b = len(seqlens)
    s = itemsize(dtype)
    small = b * h * d * s  # one [B, H, D] tensor
    extra = 4 * small if append else 0  # read k_new, v_new; write them into the caches
    return decode_kv_bytes(h, d, seqlens, dtype) + 2 * small + extra


def decode_attention_flops(h: int, d: int, seqlens: Sequence[int], append: bool) -> float:
    """q·Kᵀ and P·V for every attended position: 4·H·D FLOPs each."""
    extra = len(seqlens) if append else 0
    return 4.0 * h * d * (int(sum(seqlens)) + extra)


# ---- model-level traffic -----------------------------------------------------------------
def weight_bytes_per_decode_step(config: GPT2Config, batch: int, dtype: torch.dtype) -> int:
    """Parameters one decode step reads: every layer's weights, the final LN, the tied
    embedding/LM head in full (the logits read all of it) and ``batch`` rows of wpe."""
    c, m = config.n_embd, config.mlp_dim
    per_layer = (
        4 * c  # ln_1, ln_2 weight + bias
        + c * 3 * c
        + 3 * c  # c_attn
        + c * c
        + c  # attn c_proj
        + c * m
        + m  # c_fc
        + m * c
        + c  # mlp c_proj
    )
    total = config.n_layer * per_layer + 2 * c + config.vocab_size * c + batch * c
    return total * itemsize(dtype)


def kv_bytes_per_decode_step(config: GPT2Config, batch: int, context: float, dtype: torch.dtype) -> float:
    """K and V of all layers at an average context length ``context`` (positions already cached)."""
    return 2.0 * config.n_layer * batch * config.n_embd * context * itemsize(dtype)


# ---- measured peaks ----------------------------------------------------------------------
@dataclass(frozen=True)
class Peaks:
    """Device peaks measured by the harness in this run."""

    copy_gbps: float  # device-to-device copy, (read + write) bytes / s / 1e9
    copy_bytes: int  # size of the copied buffer
    matmul_tflops: float  # bf16 (fp32 on CPU if bf16 matmul is unusable) matmul
    matmul_dtype: str
    matmul_n: int
    copy_time: dict
    matmul_time: dict

    def as_dict(self) -> dict:
        """The JSON form (``peaks`` of the results document)."""
        return asdict(self)


def measure_copy(device: torch.device, nbytes: int, quick: bool = False) -> tuple[float, Timing]:
    """GB/s of ``dst.copy_(src)`` for ``nbytes``-byte buffers, counting read + write."""
    n = nbytes // 2
    src = torch.randn(n, device=device).to(torch.float16)
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), device, quick=quick)
    return 2 * n * 2 / (t.median_ms * 1e-3) / 1e9, t


def measure_matmul(device: torch.device, n: int, dtype: torch.dtype, quick: bool = False) -> tuple[float, Timing]:
    """TFLOP/s of an ``n`` x ``n`` x ``n`` matmul in ``dtype`` (2·n³ FLOPs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = time_call(lambda: a @ b, device, quick=quick)
    return 2.0 * n**3 / (t.median_ms * 1e-3) / 1e12, t


def measure_peaks(device: torch.device, quick: bool = False) -> Peaks:
    """Measure copy bandwidth and bf16 matmul throughput on ``device``.

    On CUDA: a 2 GiB copy and an 8192³ bf16 matmul.  On CPU: a 64 MiB copy and a 512³ matmul.
    """
    if device.type == "cuda":
        nbytes, n = (1 << 30) if quick else (2 << 30), 8192
    else:
        nbytes, n = 64 << 20, 512
    gbps, t_copy = measure_copy(device, nbytes, quick)
    dtype = torch.bfloat16
    try:
        tflops, t_mm = measure_matmul(device, n, dtype, quick)
    except RuntimeError:  # a CPU build without bf16 matmul
        dtype = torch.float32
        tflops, t_mm = measure_matmul(device, n, dtype, quick)
    return Peaks(gbps, nbytes, tflops, str(dtype).replace("torch.", ""), n, t_copy.as_dict(), t_mm.as_dict())
