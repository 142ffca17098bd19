"""Beam search on the static KV cache, with transformers' semantics (``GenerationMixin._beam_search``).

Layout: a batch of ``B`` prompts becomes ``B * num_beams`` rows of the KV cache, of the token history and of every
per-row tensor, beam ``j`` of prompt ``b`` in row ``b * num_beams + j``.  One step (:meth:`BeamState.select`),
all on the device with fixed shapes and no host sync, so the decode step with its bookkeeping can be captured in
a CUDA graph:

1. log-softmax of the logits, the logits processors (repetition penalty, no-repeat-ngram, bad words, min
   length / min new tokens, on log-probabilities as transformers applies them), plus each beam's running score;
2. the top ``K' = max(2, 1 + #EOS) * num_beams`` continuations over all beams of a prompt;
3. which of them stop (an EOS id, a stop string, or the last allowed token);
4. the best ``num_beams`` that do not stop become the running beams; the ones that stop among the top
   ``num_beams`` compete, length-penalised (``score / new_tokens ** length_penalty``), for the ``num_beams`` slots
   of finished hypotheses;
5. the early-stopping heuristic (``early_stopping`` True / False / "never") and the "is anything left to do" flag;
6. the rows are reselected: the token history, stop-string windows and the KV cache (the ``reorder_cache`` op,
   which copies only the live prefix of the rows that change beam).

Once transformers' loop would have stopped, further steps change nothing (every update is masked by the
``alive`` flag), so the host may check the flag only every few steps.  The output is the best
``num_return_sequences`` finished hypotheses per prompt with their scores (transformers' ``sequences_scores``),
cut to the longest of them.  The arithmetic follows transformers' order step for step, so fp32 results agree
bit for bit on the same device (tested against transformers on CPU).

Differences, all in corners: beam sampling (``do_sample=True``) is refused; a beam that ends by a stop string
with no EOS id configured is padded with ``pad_token_id`` (transformers pads with -1 there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from gpt2fast import ops
from gpt2fast.sampling import LogitRules, SamplingConfig, TokenHistory, process_logits
from gpt2fast.stopping import StopStrings

if TYPE_CHECKING:
    from gpt2fast.generation import Request
    from gpt2fast.model import GPT2

#: transformers' "minus infinity" of beam scores.
NEG = -1.0e9


@dataclass(frozen=True)
class BeamConfig:
    """The static part of a beam search (hashable: part of a captured graph's key)."""

    sampling: SamplingConfig  # the logits processors (greedy: no warpers)
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    max_new_tokens: int
    n_eos: int
    stop_strings: tuple[str, ...] | None = None

    @property
    def candidates(self) -> int:
        """Continuations kept per prompt and step: enough that ``num_beams`` of them do not end on an EOS id."""
        return max(2, 1 + self.n_eos) * self.num_beams


def reorder_backend(model: GPT2, rows: int, num_beams: int) -> str | None:
    """The backend the cache reorder runs on: the model's, unless it is a named backend that lacks the op or
    declines the cache (then "auto", which falls through to one that runs it)."""
    name = model.backend
    if name is None or name == ops.AUTO:
        return name
    if not any(r.op == "reorder_cache" and r.backend == name for r in ops.implementations()):
        return ops.AUTO
    cache = model.cache
    seqlens = torch.empty(rows, dtype=torch.int32, device="meta")
    idx = torch.empty(rows, dtype=torch.int64, device="meta")
    k = torch.empty(cache.k.shape, dtype=cache.k.dtype, device="meta")
    return name if ops.supported("reorder_cache", name, k, k.clone(), seqlens, idx, num_beams) is None else ops.AUTO


class BeamState:
    """The device state of one beam search, for ``B`` prompts of ``K`` beams, ``N`` new tokens at most and ``C``
    candidates per step (see :class:`BeamConfig`):

    * ``running_scores [B, K]``, ``running_new [B, K, N]``: the live beams' log-probabilities and new tokens
      (the history, stop windows and KV-cache rows hold the rest, row ``b * K + j``);
    * ``fin_scores``, ``fin_new``, ``fin_len`` (new tokens), ``fin_done`` ``[B, K(, N)]``: the finished hypotheses;
    * ``unsat [B, 1]``: the early-stopping heuristic still allows improvement; ``alive`` (0-d): transformers'
      loop would go on; ``cur`` (0-d): new tokens so far.

    ``reorder(rows)`` reselects the KV-cache rows (row ``r`` continues row ``rows[r]``).
    """

    reorders_cache = True  # a warm-up of the captured step must restore the cache's live prefixes too
    generator = None

    def __init__(
        self,
        cfg: BeamConfig,
        history: TokenHistory,
        eos_ids: torch.Tensor | None,
        fill: int,
        reorder: Callable[[torch.Tensor], None],
        rules: LogitRules | None = None,
        stop: StopStrings | None = None,
    ) -> None:
        rows, dev = history.tokens.shape[0], history.tokens.device
        K, N, C = cfg.num_beams, cfg.max_new_tokens, cfg.candidates
        B = rows // K
        self.cfg, self.history, self.eos_ids, self.reorder = cfg, history, eos_ids, reorder
        self.rules = rules if rules is not None and rules.active else None
        self.stop = stop
        f32, i64 = dict(dtype=torch.float32, device=dev), dict(dtype=torch.long, device=dev)
        self.running_scores = torch.zeros(B, K, **f32)
        self.running_scores[:, 1:] = NEG  # only the first beam's continuations count at the first step
        self.running_new = torch.full((B, K, N), fill, **i64)
        self.fin_scores = torch.full((B, K), NEG, **f32)
        self.fin_new = torch.full((B, K, N), fill, **i64)
        self.fin_len = torch.zeros(B, K, **i64)
        self.fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
        self.unsat = torch.ones(B, 1, dtype=torch.bool, device=dev)
        self.cur = torch.zeros((), **i64)
        self.alive = torch.ones((), dtype=torch.bool, device=dev)
        lp = cfg.length_penalty
        # n ** length_penalty for n new tokens, computed on the host exactly as transformers does, as float32
        self.divisors = torch.tensor([float(n**lp) if n else 1.0 for n in range(N + 1)], **f32)
        self.top_mask = torch.arange(C, device=dev) < K
        self.row_offset = torch.arange(B, device=dev)[:, None] * K
        self.rows = torch.arange(rows, device=dev)

    @classmethod
    def for_request(cls, model: GPT2, req: Request, prompt_width: int, tokenizer: object) -> BeamState:
        """The state of a validated beam-search call (the cache already set up for its rows)."""
        from gpt2fast.generation import decode_inputs

        k = req.knobs
        cfg = BeamConfig(k.sampling, k.num_beams, k.length_penalty, k.early_stopping, k.max_new_tokens,
                         len(k.eos), k.stop_strings)  # fmt: skip
        history, rules, stop = decode_inputs(model, req, prompt_width, tokenizer)
        # transformers fills unused positions with `pad_token_id or eos_token_id[0]` (a pad id of 0 gives the EOS)
        fill = (k.pad_token_id or k.eos[0]) if k.eos else req.pad_id
        cache, K = model.cache, k.num_beams
        backend = reorder_backend(model, req.prompts.shape[0], K)

        def reorder(rows: torch.Tensor) -> None:
            ops.reorder_cache(cache.k, cache.v, cache.seqlens, rows, K, backend=backend, check_values=False)

        return cls(cfg, history, req.eos_ids, fill, reorder, rules, stop)

    @property
    def finished(self) -> torch.Tensor:
        """A 0-d bool tensor: transformers' loop would have stopped."""
        return ~self.alive

    def _at(self, n: torch.Tensor) -> torch.Tensor:
        """``n ** length_penalty`` for a 0-d count ``n`` (a ``[1]`` tensor; gathered, no host sync)."""
        return self.divisors.index_select(0, n.view(1))

    def select(self, logits: torch.Tensor) -> torch.Tensor:
        """One beam-search step on ``logits [B*K, V]``: update every beam, reorder the rows (the KV cache too) and
        return each row's next input token ``[B*K]``."""
        cfg = self.cfg
        B, K = self.running_scores.shape
        N, C, V = cfg.max_new_tokens, cfg.candidates, logits.shape[-1]
        logp = process_logits(torch.log_softmax(logits.float(), dim=-1), self.history, cfg.sampling, self.rules)
        scores = (logp.view(B, K, V) + self.running_scores[:, :, None]).view(B, K * V)
        top_lp, top_idx = torch.topk(scores, C)  # [B, C]
        src, tok = top_idx // V, top_idx % V
        parent = src + self.row_offset  # the candidates' rows
        column = self.cur.view(1, 1, 1).expand(B, C, 1)
        cand_new = self.running_new.gather(1, src[..., None].expand(B, C, N)).scatter(2, column, tok[..., None])
        n_new = self.cur + 1  # new tokens of a candidate
        hits = (n_new >= N).expand(B, C)
        if self.eos_ids is not None:
            hits = hits | (tok[..., None] == self.eos_ids).any(-1)
        if self.stop is not None:
            cand_window = self.stop.extend(self.stop.window.index_select(0, parent.flatten()), tok.flatten())
            hits = hits | self.stop.matches(cand_window, tok.flatten()).view(B, C)

        # the running beams of the next step: the best K candidates that did not stop
        run_lp = top_lp + hits.to(torch.float32) * NEG
        nxt = torch.topk(run_lp, K).indices  # [B, K]
        running_scores = run_lp.gather(1, nxt)

        # the finished hypotheses: the stopping candidates among the top K compete for the K slots
        did = hits & self.top_mask
        fin_lp = top_lp / self._at(n_new)
        if cfg.early_stopping is True:
            fin_lp = fin_lp + self.fin_done.all(-1, keepdim=True).to(torch.float32) * NEG
        fin_lp = fin_lp + (~self.unsat).to(torch.float32) * NEG
        fin_lp = fin_lp + (~did) * NEG
        merged = torch.cat([self.fin_scores, fin_lp], dim=1)
        keep = torch.topk(merged, K).indices
        fin_scores = merged.gather(1, keep)
        fin_new = torch.cat([self.fin_new, cand_new], dim=1).gather(1, keep[..., None].expand(B, K, N))
        fin_len = torch.cat([self.fin_len, n_new.expand(B, C)], dim=1).gather(1, keep)
        fin_done = torch.cat([self.fin_done, did], dim=1).gather(1, keep)

        # can a running beam still beat the worst finished one?
        hypothetical = self._at(torch.full_like(n_new, N)) if cfg.early_stopping == "never" and cfg.length_penalty > 0 \
            else self._at(n_new)  # fmt: skip
        best = running_scores[:, :1] / hypothetical
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, NEG)
        unsat = self.unsat & (best > worst).any(dim=-1, keepdim=True)
        alive = unsat.any() & ~hits.all()
        if cfg.early_stopping is True:
            alive = alive & ~fin_done.all()

        # commit, unless transformers' loop has already stopped
        a = self.alive
        new_running = cand_new.gather(1, nxt[..., None].expand(B, K, N))
        for dst, new in ((self.running_scores, running_scores), (self.running_new, new_running),
                         (self.fin_scores, fin_scores), (self.fin_new, fin_new), (self.fin_len, fin_len),
                         (self.fin_done, fin_done), (self.unsat, unsat)):  # fmt: skip
            dst.copy_(torch.where(a, new, dst))
        rows = torch.where(a, parent.gather(1, nxt).flatten(), self.rows)
        tokens = tok.gather(1, nxt).flatten()
        self.history.reorder(rows)
        self.history.append(tokens, active=a)
        if self.stop is not None:
            W = cand_window.shape[-1]
            window = cand_window.view(B, C, W).gather(1, nxt[..., None].expand(B, K, W)).view(B * K, W)
            self.stop.window.copy_(torch.where(a, window, self.stop.window))
        self.reorder(rows)
        self.cur += a.long()
        self.alive &= alive
        return tokens


def finish(state: BeamState, input_ids: torch.Tensor, num_return_sequences: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sequences [B*n, T + new], sequences_scores [B*n])``: the best ``n`` finished hypotheses of each prompt
    after ``input_ids`` (repeated ``n`` times), cut to the longest (one host sync)."""
    B, _ = state.fin_scores.shape
    n = num_return_sequences
    width = int(state.fin_len[:, :n].max())
    new = state.fin_new[:, :n, :width].reshape(B * n, width)
    prompt = input_ids.repeat_interleave(n, 0)
    return torch.cat([prompt, new.to(input_ids.dtype)], dim=1), state.fin_scores[:, :n].reshape(-1).clone()
