"""Model-level byte counts, the rule that says which figure an op is read by, and the device peaks.

The peaks are *measured in the same run*, never taken from a datasheet: the
achieved bandwidth of a large device-to-device copy (bytes read + bytes written
over time) and the throughput of a large bf16 matmul.  A kernel's "% of copy
bandwidth" is then its achieved GB/s over what ``Tensor.copy_`` gets on the same
device at the same moment.

Each op's own byte and FLOP counts live in its spec (``spec.traffic``, see ``gpt2fast/ops/specs/``): the
minimum traffic of an ideal kernel, every input read once, every output written once, nothing else (no
statistics written, no re-reads).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from gpt2fast.bench.timing import Timing, time_call
from gpt2fast.config import GPT2Config


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


# ---- which figure an op is read by -------------------------------------------------------------------------
#: FLOPs per byte moved at or above which an op is read in TFLOP/s rather than GB/s.  Prefill attention reaches it
#: (T / (2 * itemsize) FLOPs per byte) in every sweep; decode attention (about 2 / itemsize) and the elementwise ops
#: (no FLOPs counted) never do.
COMPUTE_BOUND_FLOPS_PER_BYTE = 4.0


def compute_bound(records: Iterable[dict]) -> bool:
    """Whether an op's records (bench ``kernels`` records of one op) are read in TFLOP/s: some record does at
    least :data:`COMPUTE_BOUND_FLOPS_PER_BYTE` FLOPs per minimal byte.  The rest are memory-bound (GB/s)."""
    limit = COMPUTE_BOUND_FLOPS_PER_BYTE
    return any(r.get("flops") and r.get("bytes") and r["flops"] / r["bytes"] >= limit for r in records)


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
