"""Launch-config tables of the Triton kernels, in one place: autotune tiles, the tiles left out per GPU
generation (register spills), the autotune prune hooks and the heuristic configs used when autotuning is off.

A *tile* is a config written as ``(*block sizes, num_warps, num_stages)``.  The spill sets were measured by
``benchmarks/compile_check.py --full`` for sm_80 and sm_90 under triton 3.9 and 3.6: a launch on an sm_8x GPU
uses the sm_80 lists, sm_90 or newer (and the interpreter) the sm_90 ones (:func:`tuning_arch`), and neither
autotuning nor a heuristic config ever picks a tile that spills there.  The kernel modules import from here;
``compile_cases`` in each of them compiles exactly these configs, so the check and the launches cannot drift.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import triton

from gpt2fast.ops.triton._common import interpreting, next_pow2

#: A config as ``(*block sizes, num_warps, num_stages)``.
Tile = tuple[int, ...]

#: Compile targets whose register-spill-free configs the kernels keep (measured by benchmarks/compile_check.py).
SPILL_CHECKED_ARCHS = (80, 90)


@functools.cache
def tuning_arch(device: torch.device) -> int:
    """The target (80 or 90) whose spill-free config lists a launch on ``device`` uses.

    sm_8x maps to 80 and sm_90 or newer to 90 (only sm_80 and sm_90 are compile-checked); a device
    that is not a GPU (interpreter, CPU tests) maps to 90, like :func:`~gpt2fast.ops.triton._common.num_sms`.
    """
    if device.type != "cuda":
        return 90
    major, _minor = torch.cuda.get_device_capability(device)
    return 80 if major < 9 else 90


@dataclass(frozen=True)
class TileTable:
    """The autotune configs of one kernel whose usable tiles depend on the launch's dtype, head dim and target.

    ``blocks`` names the constexpr block sizes a tile sets (in tile order); ``tiles(dtype, head_dim, arch)``
    lists the tiles that do not spill there, in autotune order; ``every`` is every tile any launch may use.
    """

    blocks: tuple[str, ...]
    tiles: Callable[[torch.dtype, int, int], list[Tile]]
    every: Sequence[Tile]
    configs: list[triton.Config] = field(init=False)  # the autotuner's list: ``every``, deduplicated, in order

    def __post_init__(self) -> None:
        n = len(self.blocks)
        configs = [
            triton.Config(dict(zip(self.blocks, t[:n], strict=True)), num_warps=t[n], num_stages=t[n + 1])
            for t in dict.fromkeys(self.every)
        ]
        object.__setattr__(self, "configs", configs)

    def tile(self, cfg: triton.Config) -> Tile:
        """``cfg`` as a tile: its block sizes, warps and stages."""
        return (*(cfg.kwargs[b] for b in self.blocks), cfg.num_warps, cfg.num_stages)

    def prune(self, configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        """Autotuner ``early_config_prune`` hook: keep the tiles of :attr:`tiles` for this launch's dtype (of its
        ``Q`` argument), ``HEAD_DIM`` and GPU."""
        q = named_args["Q"]
        keep = self.tiles(q.dtype, kwargs["HEAD_DIM"], tuning_arch(q.device))
        return [c for c in configs if self.tile(c) in keep]

    def launchable(self, dtype: torch.dtype, head_dim: int, arch: int, heuristic: triton.Config) -> list[triton.Config]:
        """Every config a launch on target ``arch`` can use: the pruned autotune configs, then ``heuristic``
        (the config used with autotuning off) when it is not one of them."""
        configs = [c for c in self.configs if self.tile(c) in self.tiles(dtype, head_dim, arch)]
        if self.tile(heuristic) not in map(self.tile, configs):
            configs.append(heuristic)
        return configs


# ---- attention ------------------------------------------------------------------------------------------------
#: Autotuned (BLOCK_M, BLOCK_N, warps, stages) for fp16/bf16 (tensor-core dots) and for fp32 (FMA dots, far
#: more registers); fp16/bf16 at D=128 on sm_80 has its own list, as every tile of the default one spills there.
ATTENTION_HALF_TILES = (
    (128, 64, 8, 3),
    (128, 64, 4, 3),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (128, 32, 4, 3),
    (64, 32, 4, 2),
)
ATTENTION_HALF_TILES_SM80_D128 = ((128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3))
ATTENTION_FP32_TILES = ((32, 32, 8, 2), (64, 32, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2), (16, 16, 4, 2))
#: Tiles left out per (target, head dim) because they spill registers there under triton 3.9 or 3.6
#: (benchmarks/compile_check.py --full; fp32 16x16 spills on sm_90 only under 3.6).
ATTENTION_SPILLS = {
    (90, 128): {(128, 64, 4, 3), (128, 32, 4, 3), (32, 32, 8, 2), (64, 32, 8, 2), (16, 16, 4, 2)},
    (80, 128): {(64, 32, 8, 2)},
    (80, 64): {(128, 64, 4, 3)},
    (80, 32): {(128, 32, 4, 3)},
}


def attention_tiles(dtype: torch.dtype, head_dim: int, arch: int = 90) -> list[Tile]:
    """The tiles autotuning tries for this dtype and head dim on target ``arch`` (80 or 90, see
    :func:`tuning_arch`): none of them spills registers there."""
    if dtype == torch.float32:
        cands = ATTENTION_FP32_TILES
    else:
        cands = ATTENTION_HALF_TILES_SM80_D128 if (arch, head_dim) == (80, 128) else ATTENTION_HALF_TILES
    spills = ATTENTION_SPILLS.get((arch, head_dim), set())
    return [t for t in cands if t not in spills]


#: The attention kernel's autotune configs and prune hook.
ATTENTION = TileTable(
    ("BLOCK_M", "BLOCK_N"),
    attention_tiles,
    ATTENTION_HALF_TILES + ATTENTION_HALF_TILES_SM80_D128 + ATTENTION_FP32_TILES,
)


def attention_heuristic(head_dim: int, dtype: torch.dtype, arch: int = 90) -> triton.Config:
    """Tiles that compile without register spills on target ``arch`` (see benchmarks/compile_check.py):
    128x64 with 8 warps for fp16/bf16 at D <= 64; at D=128 64x32 with 4 warps on sm_90 and 128x32 with
    8 warps on sm_80 (where 64x32 with 4 warps spills, non-causal); for fp32 (FMA, not tensor-core, dots)
    32x32 with 8 warps, 32x16 at D=128; 64x32 in the interpreter."""
    if interpreting():
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return triton.Config({"BLOCK_M": 32, "BLOCK_N": 16 if head_dim == 128 else 32}, num_warps=8, num_stages=2)
    if head_dim == 128 and arch == 80:
        return triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=8, num_stages=2)
    if head_dim == 128:
        return triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    return triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)


# ---- decode attention -----------------------------------------------------------------------------------------
#: Autotuned (BLOCK_N, warps, stages) of the split kernel.
DECODE_TILES = ((32, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2), (64, 2, 3))
#: Tiles left out per (target, head dim, fp32?) because they spill registers there under triton 3.9 (when
#: appending) or 3.6 (sm_80 fp32 D=64 BLOCK_N=128 without append); see benchmarks/compile_check.py --full.
#: fp16/bf16 D=128 64x2x3 on sm_90 sat at 255 registers and spills 8 bytes since the kernel clamps the lengths.
DECODE_SPILLS = {
    (90, 128, True): {(128, 4, 2), (64, 2, 3)},
    (90, 128, False): {(64, 2, 3)},
    (80, 128, True): {(128, 4, 2), (64, 2, 3)},
    (80, 128, False): {(64, 2, 3)},
    (80, 64, True): {(128, 4, 2)},
}


def decode_tiles(dtype: torch.dtype, head_dim: int, arch: int = 90) -> list[Tile]:
    """The split-kernel tiles autotuning tries for this dtype and head dim on target ``arch`` (80 or 90,
    see :func:`tuning_arch`): none of them spills registers there."""
    spills = DECODE_SPILLS.get((arch, head_dim, dtype == torch.float32), set())
    return [t for t in DECODE_TILES if t not in spills]


#: The decode split kernel's autotune configs and prune hook.
DECODE_SPLIT = TileTable(("BLOCK_N",), decode_tiles, DECODE_TILES)


def decode_split_heuristic(head_dim: int) -> triton.Config:
    """64 positions per step, 4 warps (no spills at any dtype and head dim on sm_80 and sm_90); 16 positions
    under the interpreter (small test caches)."""
    if interpreting():
        return triton.Config({"BLOCK_N": 16}, num_warps=1, num_stages=1)
    return triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)


def split_bucket(split_len: int) -> int:
    """The decode split kernel's autotune key for a slice length: its next power of two.  A cache that grows
    by one position per step (``patch_hf``) changes the slice length every granule; keyed on the bucket, it
    re-tunes at most once per doubling instead of mid-stream every 128 tokens."""
    return next_pow2(split_len)


# ---- layer_norm and bias_gelu (no config spills on any target) ------------------------------------------------
#: Autotuned warps of the LayerNorm kernel (one row per program).
LAYER_NORM_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (2, 4, 8, 16)]


def layer_norm_heuristic(n: int) -> triton.Config:
    """Warps grow with the row so each thread holds ~8 fp32 values."""
    block = next_pow2(n)
    return triton.Config({}, num_warps=1 if interpreting() else min(max(block // 256, 1), 16), num_stages=1)


#: Autotuned columns per program x warps of the bias+GELU kernel.
BIAS_GELU_CONFIGS = [
    triton.Config({"BLOCK_N": b}, num_warps=w, num_stages=1) for b in (512, 1024, 2048) for w in (4, 8)
]


def bias_gelu_heuristic(n: int) -> triton.Config:
    """1024 columns and 4 warps per program (a whole row at once under the interpreter)."""
    if interpreting():
        return triton.Config({"BLOCK_N": min(next_pow2(n), 8192)}, num_warps=1, num_stages=1)
    return triton.Config({"BLOCK_N": min(next_pow2(n), 1024)}, num_warps=4, num_stages=1)


# ---- attention backward (heuristic configs only; no autotuning yet) ------------------------------------------
def attention_backward_heuristic(
    head_dim: int, dtype: torch.dtype, arch: int = 90
) -> tuple[triton.Config, triton.Config]:
    """``(dk/dv config, dq config)`` of the backward kernels, spill-free on sm_80 and sm_90 (compile_check).

    The dk/dv program keeps BLOCK_N keys (k, v and two fp32 accumulators) and steps over BLOCK_M queries; the dq
    program keeps BLOCK_M queries and steps over BLOCK_N keys.  fp32 (FMA dots) and D = 128 get smaller tiles;
    32 x 32 with one warp under the interpreter."""
    if interpreting():
        cfg = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=1, num_stages=1)
        return cfg, cfg
    if dtype == torch.float32:  # at D = 128, 4 warps spill on sm_90 (255 registers): 8
        warps = 8 if head_dim == 128 else 4
        dkdv = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=warps, num_stages=1)
        dq = triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=warps, num_stages=1)
    elif head_dim == 128:  # the dk/dv program sat at 255 registers with 4 warps on sm_80: 8
        dkdv = triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=8, num_stages=2)
        dq = triton.Config({"BLOCK_M": 64, "BLOCK_N": 16}, num_warps=4, num_stages=2)
    else:
        dkdv = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2)
        dq = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    return dkdv, dq


# ---- cross-entropy chunk kernel (one config) -----------------------------------------------------------------
def cross_entropy_heuristic(vocab: int) -> triton.Config:
    """4096 columns per step and 8 warps (16 fp32 values a thread); one warp and 8192 columns under the
    interpreter."""
    if interpreting():
        return triton.Config({"BLOCK_V": min(next_pow2(vocab), 8192)}, num_warps=1, num_stages=1)
    return triton.Config({"BLOCK_V": min(next_pow2(vocab), 4096)}, num_warps=8, num_stages=1)
