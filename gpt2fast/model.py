"""GPT-2, in the spirit of nanoGPT's model.py, built on :mod:`gpt2fast.ops`.

Every LayerNorm, the MLP's bias+GELU and both kinds of attention go through
``gpt2fast.ops`` on the backend each submodule was built with (``GPT2.backend``
sets them all).  The residual add is fused into the LayerNorm that follows it.
The KV cache is static: ``[layers, batch, heads, max_len, head_dim]`` plus an
int32 length per sequence, kept on the device; each block gets its layer's view.
Prefill and decode follow from the cache and the input, as with gpt-fast's
``input_pos``: with a cache, one token per sequence decodes at that sequence's
length, a longer input fills the cache from position 0; without one, the
forward is plain causal attention.

Training: ``model(input_ids, labels=labels)`` returns a :class:`CausalLMOutput` whose ``loss`` is
transformers' next-token loss, computed by the fused ``ops.linear_cross_entropy`` (the ``[B, T, V]``
logits are never built).  Dropout follows the config and acts only in ``train()`` mode; outside it no
dropout code runs at all.  Dropout on the attention probabilities is not in the kernels: in training with
``attn_pdrop > 0`` that one op runs as PyTorch's SDPA with dropout (FlashAttention's on a GPU).  Under
autocast the residual stream is kept in the autocast dtype and each op gets its parameters in that dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from gpt2fast import checks, fused_decode, generation, loading, ops
from gpt2fast.config import GPT2Config

#: Labels equal to this are ignored by the loss (transformers' and PyTorch's convention).
IGNORE_INDEX = -100


class CausalLMOutput(NamedTuple):
    """``GPT2.forward``'s result when given labels, named as transformers' output: ``loss``, the mean next-token
    cross-entropy (a scalar), and ``logits``, None since the fused loss never builds them."""

    loss: torch.Tensor
    logits: torch.Tensor | None = None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p)`` when training; otherwise ``x`` itself, with no call at all (inference pays nothing)."""
    return F.dropout(x, p, training=True) if training and p > 0 else x


def like(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Parameter ``p`` in activation ``x``'s dtype: ``p`` itself, unless autocast made ``x`` lower precision."""
    return p if p.dtype == x.dtype else p.to(x.dtype)


class LayerKV(NamedTuple):
    """One layer's view of a :class:`KVCache`: keys/values ``[B, H, max_len, D]`` and the shared lengths ``[B]``."""

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor


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

    def layer(self, i: int) -> LayerKV:
        """Layer ``i``'s keys and values (views, no copies) with the shared lengths."""
        return LayerKV(self.k[i], self.v[i], self.seqlens)


class LayerNorm(nn.Module):
    """LayerNorm that can fuse the residual add before it: returns ``(LN(x + residual), x + residual)``."""

    def __init__(self, n: int, eps: float, backend: str | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(LN(x), x)``, or with ``residual`` ``(LN(x + residual), x + residual)``; all ``[B, T, C]``."""
        weight, bias = like(self.weight, x), like(self.bias, x)
        if residual is None:
            return ops.layer_norm(x, weight, bias, self.eps, backend=self.backend), x
        return ops.layer_norm(x, weight, bias, self.eps, residual=residual, backend=self.backend)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused QKV projection.

    Without a cache it is plain causal attention.  With one layer's cache view, ``T == 1`` is a decode step
    (attend to the cache, appending this token's k/v at each sequence's length); a longer input is a prefill
    (causal attention, and its k/v written to the cache from position 0).  In training with ``attn_pdrop > 0``
    the attention runs as PyTorch's SDPA with dropout on the probabilities (the kernels have none).
    """

    def __init__(self, config: GPT2Config, backend: str | None = None) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_pdrop = config.resid_pdrop
        self.backend = backend

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        """``x [B, T, C]`` to ``[B, T, C]``, reading and writing ``cache`` when given."""
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.c_attn(x).view(B, T, 3, H, C // H).unbind(2)  # [B, T, H, D] each, strided views
        if cache is not None and T == 1:  # decode: attend to the cache, appending k/v at each sequence's length
            y = ops.decode_attention(
                q[:, 0],  # [B, H, D]
                cache.k,  # [B, H, max_len, D]
                cache.v,
                cache.seqlens,
                k[:, 0],  # [B, H, D]
                v[:, 0],
                backend=self.backend,
                check_seqlens=False,  # decode_step checked the host-side bound once for all layers
            )  # [B, H, D]
            y = y.view(B, 1, C)  # [B, 1, C]
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]: strided views, no copies
            if self.training and self.attn_pdrop > 0:  # dropout on the probabilities: SDPA, not the kernels
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_pdrop, is_causal=True)
            else:
                y = ops.attention(q, k, v, causal=True, backend=self.backend)  # [B, H, T, D]
            if cache is not None:  # prefill: fill the cache from position 0
                cache.k[:B, :, :T] = k  # [B, H, T, D] into [B, H, max_len, D]
                cache.v[:B, :, :T] = v
            y = y.transpose(1, 2).reshape(B, T, C)  # [B, T, H, D] -> [B, T, C]
        return dropout(self.c_proj(y), self.resid_pdrop, self.training)

    def forward_chunk(self, x: torch.Tensor, cache: LayerKV) -> torch.Tensor:
        """Chunked prefill: ``x [B, T, C]`` are the next ``T`` tokens of each sequence.  Their k/v are appended to
        ``cache`` at ``cache.seqlens[b]`` and each attends to the cached prefix and causally to the chunk."""
        B, T, C = x.shape
        H = self.n_head
        q, k, v = (t.transpose(1, 2) for t in self.c_attn(x).view(B, T, 3, H, C // H).unbind(2))  # [B, H, T, D]
        y = ops.chunk_attention(q, cache.k, cache.v, cache.seqlens, k, v, backend=self.backend, check_seqlens=False)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """c_fc, fused bias+GELU (tanh), c_proj."""

    def __init__(self, config: GPT2Config, backend: str | None = None) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_dim)
        self.c_proj = nn.Linear(config.mlp_dim, config.n_embd)
        self.resid_pdrop = config.resid_pdrop
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` to ``[B, T, C]``; c_fc's bias is added inside the GELU kernel."""
        h = F.linear(x, self.c_fc.weight)  # [B, T, M]
        h = ops.bias_gelu(h, like(self.c_fc.bias, h), backend=self.backend)
        return dropout(self.c_proj(h), self.resid_pdrop, self.training)


class Block(nn.Module):
    """Pre-LN transformer block.  Takes the previous sublayer's output ``x`` and the residual
    stream it has not been added to yet; returns the same pair for the next block."""

    def __init__(self, config: GPT2Config, backend: str | None = None) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.layer_norm_epsilon, backend)
        self.attn = CausalSelfAttention(config, backend)
        self.ln_2 = LayerNorm(config.n_embd, config.layer_norm_epsilon, backend)
        self.mlp = MLP(config, backend)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cache: LayerKV | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, residual)`` ``[B, T, C]`` each to the next block's pair; ``cache``: this layer's view."""
        y, residual = self.ln_1(x, residual)
        y, residual = self.ln_2(self.attn(y, cache), residual)
        return self.mlp(y), residual

    def forward_chunk(
        self, x: torch.Tensor, residual: torch.Tensor | None, cache: LayerKV
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` for a prefill chunk appended to ``cache`` (see :meth:`CausalSelfAttention.forward_chunk`)."""
        y, residual = self.ln_1(x, residual)
        y, residual = self.ln_2(self.attn.forward_chunk(y, cache), residual)
        return self.mlp(y), residual


#: The submodules that run ops, each holding the backend it runs them on.
_OP_MODULES = (LayerNorm, CausalSelfAttention, MLP)


class GPT2(nn.Module):
    """GPT-2 language model with a static KV cache, running its ops on ``backend``.

    ``backend``: a registered backend name, "auto", or None (the process default, see
    :func:`gpt2fast.ops.set_backend`).  A named backend that cannot run this model's shapes is refused here,
    with the reason (see :func:`gpt2fast.checks.check_backend`); its availability on a device is checked when
    an op runs.
    """

    def __init__(self, config: GPT2Config, backend: str | None = None) -> None:
        super().__init__()
        checks.check_model_backend(backend, config, torch.get_default_dtype())
        self.config = config
        self._backend = backend
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([Block(config, backend) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.layer_norm_epsilon, backend)
        self.cache: KVCache | None = None
        self.decode_path = "auto"  # "auto" | "fused" | "unfused": see gpt2fast.fused_decode

    @property
    def backend(self) -> str | None:
        """The backend every op of the model runs on (settable: the new one is checked, then given to every
        submodule)."""
        return self._backend

    @property
    def decode_path(self) -> str:
        """How :meth:`decode_step` runs: "auto" (the fused ops where the backend implements them for the step's
        shapes, else the unfused ones), "fused" or "unfused"; see :mod:`gpt2fast.fused_decode`."""
        return self._decode_path

    @decode_path.setter
    def decode_path(self, value: str) -> None:
        self._decode_path = fused_decode.check_decode_path(value)

    @backend.setter
    def backend(self, name: str | None) -> None:
        checks.check_model_backend(name, self.config, self.wte.weight.dtype)
        for module in self.modules():
            if isinstance(module, _OP_MODULES):
                module.backend = name
        self._backend = name

    # ---- forward passes -------------------------------------------------------------
    def _hidden(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Final hidden states ``[B, T, C]`` of ids ``idx [B, T]`` at positions ``pos`` (``[T]`` or ``[B, T]``).

        With ``cache``: ``T == 1`` decodes one token per sequence at its cache length; otherwise the cache is
        filled from position 0 (prefill).
        """
        x, residual = self.wte(idx) + self.wpe(pos), None  # [B, T, C]
        if torch.is_autocast_enabled(x.device.type):  # the residual stream in the autocast dtype, as the ops take it
            x = x.to(torch.get_autocast_dtype(x.device.type))
        x = dropout(x, self.config.embd_pdrop, self.training)
        for i, block in enumerate(self.h):
            x, residual = block(x, residual, None if cache is None else cache.layer(i))
        y, _ = self.ln_f(x, residual)
        return y

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | CausalLMOutput:
        """Full causal forward without the cache: ``[B, T]`` ids to ``[B, T, V]`` logits.

        With ``labels`` (``[B, T]``, usually the ids themselves, ``-100`` where no loss is wanted) it returns
        :class:`CausalLMOutput` instead: ``loss`` as ``transformers.GPT2LMHeadModel(input_ids,
        labels=labels).loss`` computes it (position ``t`` predicts ``labels[:, t + 1]``; the mean over the
        labels that are not ``-100``; 0 when there are none) and ``logits=None``: the loss is the fused
        ``ops.linear_cross_entropy`` over the final hidden states, so the logits are never built.
        """
        self.check_ids(input_ids)
        if labels is not None:
            checks.check_labels(labels, input_ids)
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)  # [T]
        y = self._hidden(input_ids, pos)  # [B, T, C]
        if labels is None:
            return F.linear(y, self.wte.weight)  # [B, T, V]
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]: the next token; none after the last
        loss = ops.linear_cross_entropy(
            y.reshape(B * T, -1),  # [B*T, C]
            like(self.wte.weight, y),  # [V, C]: the LM head, tied to the token embedding
            targets.reshape(B * T),  # [B*T]
            ignore_index=IGNORE_INDEX,
            reduction="mean",
            backend=self.backend,
        )
        return CausalLMOutput(loss)

    def setup_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """(Re)allocate the static KV cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        c = self.config
        max_len = c.n_positions if max_len is None else max_len
        checks.check_cache_size(batch_size, max_len, c.n_positions)
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
        lengths, longest = checks.check_prefill(input_ids, lengths, self.cache)
        B, T = input_ids.shape
        cache = self.cache
        cache.seqlens.zero_()  # the prompts start at position 0 (a 1-token prompt is appended there)
        y = self._hidden(input_ids, torch.arange(T, device=input_ids.device), cache)  # [B, T, C]
        cache.seqlens.copy_(lengths)
        cache.host_max = longest
        last = y[torch.arange(B, device=y.device), lengths.long() - 1]  # [B, C]
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
        checks.check_decode_tokens(tokens, cache, self.config.vocab_size, check_ids)
        if fused_decode.use_fused(self, tokens.shape[0]):  # four ops per layer; else the unfused ops below
            logits = fused_decode.decode_logits(self, tokens)
        else:
            pos = cache.seqlens.long()[:, None]  # [B, 1]
            logits = F.linear(self._hidden(tokens[:, None], pos, cache)[:, 0], self.wte.weight)
        cache.seqlens += 1
        cache.host_max += 1
        return logits

    @torch.no_grad()
    def prefill_chunk(self, input_ids: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Append the next ``T`` prompt tokens ``input_ids [B, T]`` of every sequence of ``cache`` (all ``start``
        tokens long) and return the logits ``[B, V]`` at each chunk's last token; the lengths become ``start + T``.

        For chunked prefill into chosen cache rows (``cache`` may hold views of some rows of a bigger cache, as
        ``gpt2fast.serve`` does).  ``start == 0`` is :meth:`prefill`'s computation; a later chunk attends to the
        cached prefix through ``ops.chunk_attention``.  The ids are not range-checked (no device read-back):
        the caller checks them once per prompt.
        """
        T = input_ids.shape[1]
        if not 0 <= start <= cache.max_len - T:
            raise ValueError(f"a chunk of {T} tokens at position {start} does not fit the cache's {cache.max_len}")
        pos = torch.arange(start, start + T, device=input_ids.device)  # [T]
        if start == 0:
            cache.seqlens.zero_()  # (a 1-token prompt is appended at position 0, as in prefill)
            y = self._hidden(input_ids, pos, cache)  # [B, T, C]: causal attention, k/v written from position 0
        else:
            x, residual = self.wte(input_ids) + self.wpe(pos), None
            for i, block in enumerate(self.h):
                x, residual = block.forward_chunk(x, residual, cache.layer(i))
            y, _ = self.ln_f(x, residual)
        cache.seqlens.fill_(start + T)
        cache.host_max = max(cache.host_max, start + T)
        return F.linear(y[:, -1], self.wte.weight)

    # ---- loading, saving, generation (the logic lives in loading.py / generation.py) ----
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
        quiet: bool = False,
    ) -> GPT2:
        """Load a Hugging Face GPT-2 checkpoint directory (config.json + model.safetensors or
        pytorch_model.bin) or weight file.  ``dtype=None`` keeps the stored dtype; ``device=None`` is CPU."""
        return loading.load_pretrained(path, dtype, device, backend, quiet)

    @classmethod
    def from_hf(
        cls,
        hf_model: nn.Module,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> GPT2:
        """Copy the weights of a transformers ``GPT2LMHeadModel``."""
        return loading.from_hf(hf_model, dtype, device, backend)

    @classmethod
    def random(
        cls,
        config: GPT2Config | str,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str | None = None,
    ) -> GPT2:
        """GPT-2-initialised random weights for a ``GPT2Config`` or a size name ("gpt2", ..., "gpt2-xl")."""
        return loading.random_init(config, seed, dtype, device, backend)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json + model.safetensors that transformers' ``GPT2LMHeadModel`` loads."""
        loading.save_pretrained(self, directory)

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor | generation.GenerateOutput:
        """transformers-style generate; returns ``[B * num_return_sequences, T + new]`` (prompt + new tokens), or a
        :class:`gpt2fast.generation.GenerateOutput` with ``return_dict_in_generate=True``.

        Knobs (transformers' semantics and defaults, except ``top_k=0``, off): ``max_new_tokens=None`` (20 unless
        ``max_length`` is given), ``max_length``, ``min_new_tokens=0``, ``min_length=0``, ``do_sample=False``,
        ``temperature=1.0``, ``top_k=0``, ``top_p=1.0``, ``min_p=None``, ``typical_p=1.0``,
        ``repetition_penalty=1.0``, ``no_repeat_ngram_size=0``, ``bad_words_ids=None``, ``eos_token_id=None``,
        ``pad_token_id=None``, ``num_beams=1``, ``length_penalty=1.0``, ``early_stopping=False`` (or True,
        "never"), ``num_return_sequences=1``, ``stop_strings=None`` (needs ``tokenizer``),
        ``return_dict_in_generate=False``; plus ``generation_config`` (a transformers ``GenerationConfig``;
        keyword arguments win), ``generator``, ``use_cuda_graph=None`` and ``tokenizer``.  A transformers knob
        gpt2fast does not implement raises ``ValueError`` naming it unless it holds its inert default
        (:data:`gpt2fast.generation.REFUSED`); an unknown keyword raises ``TypeError``.  See
        :func:`gpt2fast.generation.generate`."""
        return generation.generate(self, input_ids, attention_mask, **kwargs)

    def generate_stream(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> Iterator[torch.Tensor]:
        """Like :meth:`generate` but returns an iterator over each step's new tokens ``[B]``."""
        return generation.generate_stream(self, input_ids, attention_mask, **kwargs)

    # ---- checks ---------------------------------------------------------------------
    def check_ids(self, input_ids: torch.Tensor) -> None:
        """Raise a clear error for ids that are not a 2-D integer tensor within the vocab and context."""
        checks.check_ids(input_ids, self.config, self.wte.weight.device)
