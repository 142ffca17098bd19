"""The baseline of ``gpt2fast bench serve``: one transformers ``generate`` per request, one request at a time.

:class:`NaiveEngine` has the engine interface the server needs (the same queue, checks, callbacks and metrics
as :class:`~gpt2fast.serve.engine.Engine`), so it runs behind the very same HTTP layer; what differs is only
that each :meth:`step` takes the oldest waiting request and runs ``GPT2LMHeadModel.generate`` on it alone,
streaming its tokens through a ``BaseStreamer`` and stopping early when it is cancelled.
"""

from __future__ import annotations

import tempfile
import time
from typing import TYPE_CHECKING

import torch

from gpt2fast.serve.engine import Metrics, Request, RequestQueue

if TYPE_CHECKING:
    from gpt2fast.model import GPT2


def hf_copy(model: GPT2):
    """A transformers ``GPT2LMHeadModel`` with ``model``'s weights, dtype and device (eager attention)."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = GPT2LMHeadModel.from_pretrained(d, torch_dtype=model.wte.weight.dtype, attn_implementation="eager")
    hf.generation_config.eos_token_id = None  # stop ids come from each request
    hf.generation_config.pad_token_id = 0
    return hf.to(model.wte.weight.device).eval()


class NaiveEngine(RequestQueue):
    """transformers ``generate``, one request at a time (``max_len``: the context checked per request)."""

    max_batch = 1

    def __init__(self, hf_model, max_queue: int = 256, max_len: int | None = None, max_stop_ids: int = 8,
                 metrics: Metrics | None = None) -> None:  # fmt: skip
        cfg = hf_model.config
        super().__init__(cfg.vocab_size, cfg.n_positions if max_len is None else max_len, max_queue, max_stop_ids,
                         metrics)  # fmt: skip
        self.hf = hf_model
        self.device = next(hf_model.parameters()).device
        self._current: Request | None = None

    @property
    def num_running(self) -> int:
        """1 while a request is generating."""
        return int(self._current is not None)

    def _running(self) -> list[Request]:
        return [] if self._current is None else [self._current]

    def _release(self, r: Request) -> None:
        r.slot = None
        if self._current is r:
            self._current = None

    @torch.no_grad()
    def step(self) -> int:
        """Serve the oldest waiting request to its end; returns the number of tokens it produced."""
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        self._apply_cancels()
        r = self._pop_waiting()
        if r is None:
            return 0
        r.slot, self._current = 0, r
        cancelled = False
        engine = self

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                nonlocal cancelled
                with engine._lock:
                    cancelled = cancelled or any(c is r for c in engine._cancels)
                return torch.full((input_ids.shape[0],), cancelled, dtype=torch.bool, device=input_ids.device)

        class Stream(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate pushes the prompt first
                    self.prompt_seen = True
                    return
                tokens = value.reshape(-1).tolist()
                if not cancelled and len(r.output) + len(tokens) < p.max_tokens and tokens[-1] not in stops:
                    engine._emit(r, tokens, None, time.perf_counter())
                else:
                    self.last = tokens

            def end(self) -> None:
                pass

        p, stops = r.params, set(r.params.stop_token_ids)
        stream = Stream()
        stream.last = []
        if p.temperature > 0:
            torch.manual_seed(r.seed & 0x7FFFFFFFFFFFFFFF)
        sample = dict(do_sample=True, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p) if p.temperature > 0 \
            else dict(do_sample=False)  # fmt: skip
        ids = torch.tensor([r.prompt], device=self.device)
        self.hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=p.max_tokens, min_new_tokens=0,
            repetition_penalty=p.repetition_penalty, eos_token_id=list(stops) or None, pad_token_id=0,
            streamer=stream, stopping_criteria=StoppingCriteriaList([Cancelled()]), **sample,
        )  # fmt: skip
        self._apply_cancels()  # a cancel that arrived during generate ends it as "cancelled"
        if not r.finished:
            reason = "stop" if stream.last and stream.last[-1] in stops else "length"
            self._release(r)
            self._emit(r, stream.last, reason, time.perf_counter())
        self._current = None
        return len(r.output)
