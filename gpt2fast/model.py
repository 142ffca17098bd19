"""GPT-2, in the spirit of nanoGPT's model.py, built on :mod:`gpt2fast.ops`.

Every LayerNorm, the MLP's bias+GELU and both kinds of attention go through
``gpt2fast.ops`` with the model's backend.  The residual add is fused into the
LayerNorm that follows it.  The KV cache is static: ``[layers, batch, heads,
max_len, head_dim]`` plus an int32 length per sequence, kept on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpt2fast import generation, loading, ops
from gpt2fast.config import GPT2Config


@dataclass
class KVCache:
    """Preallocated keys/values ``[n_layer, B, H, max_len, D]`` and per-sequence lengths ``[B]`` (int32)."""

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor
    host_max: int = 0  # host-side upper bound of seqlens: lets decode_step refuse an overflow without a sync

    @property
    def batch_size(self) -> int:
        """Number of sequences the cache holds."""
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        """Positions per sequence."""
        return self.k.shape[3]


class LayerNorm(nn.Module):
    """LayerNorm that can fuse the residual add before it: returns ``(LN(x + residual), x + residual)``."""

    def __init__(self, n: int, eps: float, model: GPT2) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.eps = eps
        self._model = [model]  # a list, so the parent is not registered as a submodule

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        backend = self._model[0].backend
        if residual is None:
            return ops.layer_norm(x, self.weight, self.bias, self.eps, backend=backend), x
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual, backend=backend)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection."""

    def __init__(self, config: GPT2Config, model: GPT2) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self._model = [model]

    def forward(self, x: torch.Tensor, layer: int, mode: str) -> torch.Tensor:
        model = self._model[0]
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(2)
        if mode == "decode":  # T == 1: attend to the cache, appending k/v at each sequence's length
            cache = model.cache
            y = ops.decode_attention(
                q[:, 0],
                cache.k[layer],
                cache.v[layer],
                cache.seqlens,
                k[:, 0],
                v[:, 0],
                backend=model.backend,
                check_seqlens=False,  # decode_step checked the host-side bound once for all layers
            )
            y = y.view(B, 1, C)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
            y = ops.attention(q, k, v, causal=True, backend=model.backend)  # strided views: no copies
            if mode == "prefill":  # fill the cache from position 0
                model.cache.k[layer, :B, :, :T] = k
                model.cache.v[layer, :B, :, :T] = v
            y = y.transpose(1, 2).reshape(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    """c_fc, fused bias+GELU (tanh), c_proj."""

    def __init__(self, config: GPT2Config, model: GPT2) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_dim)
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd)
        self._model = [model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.bias_gelu(F.linear(x, self.c_fc.weight), self.c_fc.bias, backend=self._model[0].backend)
        return self.c_proj(h)


class Block(nn.Module):
    """Pre-LN transformer block.  Takes the previous sublayer's output ``x`` and the residual
    stream it has not been added to yet; returns the same pair for the next block."""

    def __init__(self, config: GPT2Config, model: GPT2) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, model)
        self.attn = CausalSelfAttention(config, model)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, model)
        self.mlp = MLP(config, model)

    def forward(self, x, residual, layer: int, mode: str):
        y, residual = self.ln_1(x, residual)
        y, residual = self.ln_2(self.attn(y, layer, mode), residual)
        return self.mlp(y), residual


class GPT2(nn.Module):
    """GPT-2 language model with a static KV cache, running its ops on ``backend``."""

    def __init__(self, config: GPT2Config, backend: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.backend = backend
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([Block(config, self) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, self)
        self.cache: KVCache | None = None

    # ---- forward passes -------------------------------------------------------------
    def _run(self, idx: torch.Tensor, pos: torch.Tensor, mode: str) -> torch.Tensor:
        x, residual = self.wte(idx) + self.wpe(pos), None
        for i, block in enumerate(self.h):
            x, residual = block(x, residual, i, mode)
        y, _ = self.ln_f(x, residual)
        return y

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full causal forward without the cache: ``[B, T]`` ids to ``[B, T, V]`` logits."""
        self.check_ids(input_ids)
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        return F.linear(self._run(input_ids, pos, "full"), self.wte.weight)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """(Re)allocate the static KV cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        c = self.config
        max_len = c.n_positions if max_len is None else max_len
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 1 <= max_len <= c.n_positions:
            raise ValueError(f"max_len must be in [1, n_positions={c.n_positions}], got {max_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        p = self.wte.weight
        shape = (c.n_layer, batch_size, c.n_head, max_len, c.head_dim)
        cache = self.cache
        if cache is None or cache.k.shape != shape or cache.k.dtype != p.dtype or cache.k.device != p.device:
            cache = KVCache(
                torch.zeros(shape, dtype=p.dtype, device=p.device),
                torch.zeros(shape, dtype=p.dtype, device=p.device),
                torch.zeros(batch_size, dtype=torch.int32, device=p.device),
            )
        cache.seqlens.zero_()
        cache.host_max = 0
        self.cache = cache
        return cache

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Run right-padded prompts ``[B, T]`` (true lengths ``lengths``) into an empty cache.

        Returns the logits ``[B, V]`` at each prompt's last token and sets the cache lengths.
        Padding sits after each prompt, so causal attention never lets a real token see it.
        """
        self.check_ids(input_ids)
        B, T = input_ids.shape
        if self.cache is None or self.cache.batch_size != B:
            raise RuntimeError(f"call setup_cache({B}, max_len) before prefill")
        if T > self.cache.max_len:
            raise ValueError(f"prompt length {T} exceeds the cache's max_len {self.cache.max_len}")
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.int32, device=input_ids.device)
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
        y = self._run(input_ids, torch.arange(T, device=input_ids.device), "prefill")
        self.cache.seqlens.copy_(lengths)
        self.cache.host_max = hi
        last = y[torch.arange(B, device=y.device), lengths.long() - 1]
        return F.linear(last, self.wte.weight)

    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, check_ids: bool = True) -> torch.Tensor:
        """Append one token per sequence (``[B]``) to the cache; returns next-token logits ``[B, V]``.

        Positions come from the on-device cache lengths and a full cache is refused through the
        host-side bound ``cache.host_max``.  ``check_ids`` range-checks the ids (a device read-back);
        generation passes False (its sampled ids are in range), so its step has no host sync and can
        be captured in a CUDA graph.
        """
        cache = self.cache
        if cache is None:
            raise RuntimeError("call setup_cache(B, max_len) and prefill before decode_step")
        if tokens.dim() != 1 or tokens.shape[0] != cache.batch_size or tokens.dtype.is_floating_point:
            raise ValueError(
                f"tokens must be integer ids [{cache.batch_size}], got {tokens.dtype} {list(tokens.shape)}"
            )
        if check_ids and not bool(((tokens >= 0) & (tokens < self.config.vocab_size)).all()):
            raise ValueError(f"tokens contain an id outside the vocabulary [0, {self.config.vocab_size})")
        if cache.host_max >= cache.max_len:
            raise ValueError(f"the KV cache is full ({cache.max_len} positions); cannot decode another token")
        y = self._run(tokens[:, None], cache.seqlens.long()[:, None], "decode")
        cache.seqlens += 1
        cache.host_max += 1
        return F.linear(y[:, 0], self.wte.weight)

    # ---- loading, saving, generation (the logic lives in loading.py / generation.py) ----
    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None, backend: str | None = None, quiet: bool = False) -> GPT2:
        """Load a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors or
        pytorch_model.bin) or weight file.  ``dtype=None`` keeps the stored dtype; ``device=None`` is CPU."""
        return loading.load_pretrained(path, dtype, device, backend, quiet)

    @classmethod
    def from_hf(cls, hf_model, dtype=None, device=None, backend: str | None = None) -> GPT2:
        """Copy the weights of a transformers ``GPT2LMHeadModel``."""
        return loading.from_hf(hf_model, dtype, device, backend)

    @classmethod
    def random(cls, config, seed: int = 0, dtype=torch.float32, device="cpu", backend: str | None = None) -> GPT2:
        """GPT-2-initialised random weights for a ``GPT2Config`` or a size name ("gpt2", ..., "gpt2-xl")."""
        return loading.random_init(config, seed, dtype, device, backend)

    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors that transformers' ``GPT2LMHeadModel`` loads."""
        loading.save_pretrained(self, directory)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """transformers-style generate: max_new_tokens=20, do_sample=False, temperature=1.0, top_k=0,
        top_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=None, pad_token_id=None,
        generator=None, use_cuda_graph=None.  Returns ``[B, T + new]``; see :func:`gpt2fast.generation.generate`."""
        return generation.generate(self, input_ids, attention_mask, **kwargs)

    def generate_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        """Like :meth:`generate` but returns an iterator over each step's new tokens ``[B]``."""
        return generation.generate_stream(self, input_ids, attention_mask, **kwargs)

    # ---- checks ---------------------------------------------------------------------
    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Raise a clear error for ids that are not a 2-D integer tensor within the vocab and context."""
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool or input_ids.is_complex():
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D [batch, seq], got shape {list(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {list(input_ids.shape)})")
        if input_ids.device != self.wte.weight.device:
            raise RuntimeError(f"input_ids is on {input_ids.device} but the model is on {self.wte.weight.device}")
        if input_ids.shape[1] > self.config.n_positions:
            raise ValueError(f"sequence length {input_ids.shape[1]} exceeds n_positions={self.config.n_positions}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"input_ids contains id {bad}, outside the vocabulary [0, {self.config.vocab_size})")
