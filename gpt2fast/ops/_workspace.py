"""Scratch that kernel backends keep between launches: the zeroed arrival counters of last-arriving-program
reductions (a split-K GEMV's tiles, a flash-decoding merge), shared by the Triton and CUDA backends."""

from __future__ import annotations

import torch

#: Zeroed int32 arrival counters by (device, stream, length); kept for the process (a captured graph holds them).
_COUNTERS: dict[tuple, torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` int32 arrival counters, zero between launches (every kernel that counts on them resets them).

    One buffer per (device, current stream, length): launches on one stream run in order, so they can share it;
    two streams never do.  It is allocated on first use (the warm-up before a CUDA-graph capture) and never
    freed, so a captured graph can keep pointing at it.
    """
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, n)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = _COUNTERS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return buf
