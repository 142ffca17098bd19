"""Argument checks of the model and of generation, in one place.

Every check raises before any model state changes or any kernel launches, with a message that names the
argument and what was expected (``tests/test_bad_input_catalogue.py`` pins those messages).  The op
arguments themselves are checked by each op's spec (``gpt2fast/ops/specs``); this module checks what the
model and ``generate`` take: token ids, cache sizes, prompt lengths, generate's knobs, and whether a named
backend can run a model of a given shape at all (:func:`check_backend`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from gpt2fast import ops
from gpt2fast.ops._validate import FLOAT_DTYPES

if TYPE_CHECKING:
    from gpt2fast.config import GPT2Config
    from gpt2fast.model import KVCache
    from gpt2fast.sampling import SamplingConfig


# ---- scalars -------------------------------------------------------------------------------------------------
def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` is an int (not a bool) in ``[low, high)`` (``high=None``: no upper bound); returns it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value >= high):
        bounds = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


# ---- the backend, against the model's shapes -----------------------------------------------------------------
def _meta_op_args(
    n_embd: int, n_head: int, mlp_dim: int | None, eps: float, dtype: torch.dtype
) -> list[tuple[str, tuple]]:
    """``(op, args)`` for every op call of a GPT-2 block of these widths, on meta tensors laid out as the model
    passes them (batch 1, two tokens): q/k/v are strided views of the fused QKV projection."""
    D = n_embd // n_head
    like = dict(dtype=dtype, device="meta")
    qkv = torch.empty(1, 2, 3, n_head, D, **like)  # [B, T, 3, H, D]: c_attn's output, viewed per head
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, T, D] each, strided
    q1, k1, v1 = torch.empty(1, 1, 3, n_head, D, **like)[:, 0].unbind(1)  # [B, H, D] each: one decode token
    k_cache, v_cache = torch.empty(1, n_head, 2, D, **like), torch.empty(1, n_head, 2, D, **like)  # [B, H, T_max, D]
    seqlens = torch.zeros(1, dtype=torch.int32, device="meta")  # [B]
    x, w = torch.empty(1, n_embd, **like), torch.empty(n_embd, **like)  # [rows, C], [C]
    calls = [
        ("layer_norm", (x, w, w, eps, None)),
        ("layer_norm", (x, w, w, eps, x)),  # with the residual add fused in
        ("attention", (q, k, v, True, None)),
        ("decode_attention", (q1, k_cache, v_cache, seqlens, k1, v1, None)),
    ]
    if mlp_dim is not None:
        calls.append(("bias_gelu", (torch.empty(1, mlp_dim, **like), torch.empty(mlp_dim, **like))))  # [rows, M], [M]
    return calls


def check_backend(
    backend: str | None,
    *,
    n_embd: int,
    n_head: int,
    mlp_dim: int | None,
    eps: float = 1e-5,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Refuse a named ``backend`` that cannot run a GPT-2 of these widths: raise ``ValueError`` naming the
    backend and the reason (an unknown name, an op it lacks, or an input its ``supports`` declines, such as a
    head dim).  ``mlp_dim=None`` skips ``bias_gelu``.  ``"auto"`` and ``None`` never raise: they fall through
    per call.  Whether the backend runs on a device is checked at call time (``BackendUnavailableError``).
    """
    if backend is None or backend == ops.AUTO:
        return
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {backend!r}")
    names = ops.backend_names()
    if backend not in names:
        raise ValueError(f"unknown backend {backend!r}; choose one of {(*names, ops.AUTO)}")
    dtype = dtype if dtype in FLOAT_DTYPES else torch.float32  # other dtypes never reach the ops
    for op, args in _meta_op_args(n_embd, n_head, mlp_dim, eps, dtype):
        reason = ops.supported(op, backend, *args)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot run this model: {reason}")


def check_model_backend(backend: str | None, config: GPT2Config, dtype: torch.dtype) -> None:
    """:func:`check_backend` for a gpt2fast model of ``config`` in ``dtype``."""
    check_backend(
        backend,
        n_embd=config.n_embd,
        n_head=config.n_head,
        mlp_dim=config.mlp_dim,
        eps=config.layer_norm_epsilon,
        dtype=dtype,
    )


# ---- the model's inputs --------------------------------------------------------------------------------------
def check_ids(input_ids: object, config: GPT2Config, device: torch.device) -> None:
    """``input_ids`` is a non-empty 2-D integer tensor on ``device``, within the vocab and the context."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [batch, seq], got shape {list(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)})")
    if input_ids.device != device:
        raise RuntimeError(f"input_ids is on {input_ids.device} but the model is on {device}")
    if input_ids.shape[1] > config.n_positions:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds n_positions={config.n_positions}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids contains id {bad}, outside the vocabulary [0, {config.vocab_size})")


def check_labels(labels: object, input_ids: torch.Tensor) -> None:
    """``labels`` for the loss of checked ``input_ids``: an integer tensor of the same shape and device (the op
    checks the values: a vocab id or the ignore index)."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have input_ids' shape {list(input_ids.shape)}, got {list(labels.shape)}")
    if labels.device != input_ids.device:
        raise RuntimeError(f"labels is on {labels.device} but input_ids is on {input_ids.device}")


def check_cache_size(batch_size: object, max_len: object, n_positions: int) -> None:
    """``setup_cache``'s sizes: ints, ``1 <= max_len <= n_positions`` and ``batch_size >= 1``."""
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= max_len <= n_positions:
        raise ValueError(f"max_len must be in [1, n_positions={n_positions}], got {max_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def check_prefill(input_ids: torch.Tensor, lengths: object, cache: KVCache | None) -> tuple[torch.Tensor, int]:
    """``prefill``'s cache and prompt lengths, for already checked ``input_ids [B, T]``.

    Returns the lengths as int32 on the ids' device (``T`` each when ``lengths`` is None) and their maximum.
    """
    B, T = input_ids.shape
    if cache is None or cache.batch_size != B:
        raise RuntimeError(f"call setup_cache({B}, max_len) before prefill")
    if T > cache.max_len:
        raise ValueError(f"prompt length {T} exceeds the cache's max_len {cache.max_len}")
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int32, device=input_ids.device), T
    if (
        not isinstance(lengths, torch.Tensor)
        or lengths.dtype.is_floating_point
        or lengths.dtype == torch.bool
        or tuple(lengths.shape) != (B,)
    ):
        raise ValueError(f"lengths must be an integer tensor of shape [{B}], got {lengths!r}")
    lengths = lengths.to(device=input_ids.device, dtype=torch.int32)
    lo, hi = int(lengths.min()), int(lengths.max())
    if lo < 1 or hi > T:
        raise ValueError(f"lengths must lie in [1, {T}], got {lengths.tolist()}")
    return lengths, hi


def check_decode_tokens(tokens: torch.Tensor, cache: KVCache | None, vocab_size: int, check_ids: bool) -> None:
    """``decode_step``'s tokens ``[B]`` and cache; ``check_ids`` range-checks the ids (a device read-back)."""
    if cache is None:
        raise RuntimeError("call setup_cache(B, max_len) and prefill before decode_step")
    if tokens.dim() != 1 or tokens.shape[0] != cache.batch_size or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be integer ids [{cache.batch_size}], got {tokens.dtype} {list(tokens.shape)}")
    if check_ids and not bool(((tokens >= 0) & (tokens < vocab_size)).all()):
        raise ValueError(f"tokens contain an id outside the vocabulary [0, {vocab_size})")
    check_cache_room(cache)


def check_cache_room(cache: KVCache) -> None:
    """Refuse a decode step on a full cache, by its host-side bound ``host_max`` (no device sync)."""
    if cache.host_max >= cache.max_len:
        raise ValueError(f"the KV cache is full ({cache.max_len} positions); cannot decode another token")


# ---- generate ------------------------------------------------------------------------------------------------
def check_attention_mask(input_ids: torch.Tensor, attention_mask: object) -> torch.Tensor:
    """Per-sequence prompt lengths ``[B]`` (int32) from a left-padding ``attention_mask`` of 0/1 (``None``: all
    of ``input_ids [B, T]``)."""
    B, T = input_ids.shape
    if attention_mask is None:
        return torch.full((B,), T, dtype=torch.int32, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask must have input_ids' shape {[B, T]}, got {list(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be an integer or bool tensor of 0/1, got {attention_mask.dtype}")
    if attention_mask.device != input_ids.device:
        raise RuntimeError(f"attention_mask is on {attention_mask.device} but input_ids is on {input_ids.device}")
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    lengths = mask.sum(1)
    left_padded = torch.arange(T, device=mask.device)[None, :] >= (T - lengths)[:, None]
    if not bool((left_padded == mask.bool()).all()):
        raise ValueError("attention_mask must be left-padded: each row is zeros followed by ones")
    if int(lengths.min()) < 1:
        raise ValueError("attention_mask has a row with no tokens; every prompt needs at least one")
    return lengths.to(torch.int32)


def check_context(longest_prompt: int, max_new_tokens: int, n_positions: int) -> None:
    """The longest prompt plus ``max_new_tokens`` (already checked) fits in the model's context."""
    if longest_prompt + max_new_tokens > n_positions:
        raise ValueError(
            f"prompt length {longest_prompt} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"n_positions={n_positions}"
        )


def check_special_tokens(eos_token_id: object, pad_token_id: object, vocab_size: int) -> tuple[list[int], int]:
    """EOS ids (an id, a list of ids or None) within the vocab, and the pad id (default: the first EOS id,
    else 0); returns ``(eos ids, pad id)``."""
    if eos_token_id is None:
        eos = []
    elif isinstance(eos_token_id, (list, tuple)):
        eos = [check_int("eos_token_id", e, 0, vocab_size) for e in eos_token_id]
    else:
        eos = [check_int("eos_token_id", eos_token_id, 0, vocab_size)]
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    return eos, check_int("pad_token_id", pad_token_id, 0)


def check_sampling(cfg: SamplingConfig) -> None:
    """The sampling knobs of a :class:`~gpt2fast.sampling.SamplingConfig`: raise ``TypeError``/``ValueError``
    naming the first bad one."""
    if not isinstance(cfg.do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {cfg.do_sample!r}")
    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{name} must be a finite number, got {value!r}")
    for name in ("top_k", "no_repeat_ngram_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if cfg.do_sample and cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {cfg.temperature}")
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {cfg.top_p}")
    if cfg.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {cfg.top_k}")
    if cfg.repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1.0 disables it), got {cfg.repetition_penalty}")
    if cfg.no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0 (0 disables it), got {cfg.no_repeat_ngram_size}")


def check_generator(generator: object, device: torch.device) -> None:
    """``generator`` is None or a ``torch.Generator`` of the model's device."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    gen_device = generator.device
    if gen_device.type != device.type or gen_device.index not in (None, device.index):
        # another GPU's generator: its graph-safe seed/offset tensors live there, out of the graph's reach
        raise ValueError(f"generator is on {gen_device} but the model is on {device}")


def check_use_cuda_graph(use_cuda_graph: object, device: torch.device) -> None:
    """``use_cuda_graph`` is None or a bool, and True only for a CUDA model."""
    if use_cuda_graph not in (None, True, False):
        raise TypeError(f"use_cuda_graph must be None or a bool, got {use_cuda_graph!r}")
    if use_cuda_graph and device.type != "cuda":
        raise ValueError(f"use_cuda_graph=True needs a CUDA model; this one is on {device}")
