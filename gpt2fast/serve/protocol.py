"""OpenAI's completions protocol: checking a request body, turning engine tokens into choice text, the JSON out.

:func:`parse_completion` checks a ``POST /v1/completions`` body field by field and raises :class:`APIError`
(an OpenAI-style error: HTTP status, message naming the field, ``param``, ``type``, ``code``).  Accepted:
``model``, ``prompt`` (a string, a list of strings, a list of token ids or a list of such lists), ``max_tokens``,
``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, ``stream``, ``stream_options.include_usage``,
``user``; vLLM's extensions ``top_k``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``.  Fields this
server cannot honour (``logprobs``, ``echo``, ``suffix``, ``logit_bias``, ``best_of`` other than ``n``, non-zero
presence/frequency penalties) are refused with a 400 rather than ignored.  Unknown fields are ignored.

:class:`ChoiceText` turns one choice's tokens into text as they arrive: UTF-8 safe (the tokenizer's stream
decoder), the stop token left out, stop strings cut (text that could still become a stop string is held back
while streaming).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpt2fast.serve.engine import RequestError, SamplingParams

if TYPE_CHECKING:
    from gpt2fast.tokenizer import Tokenizer

#: Limits of one request.
MAX_N = 16
MAX_STOP_STRINGS = 4
MAX_PROMPTS = 64


class APIError(Exception):
    """An error answered as OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 naming ``param``."""
    return APIError(400, message, param, code=code)


@dataclass
class CompletionRequest:
    """A checked completions request: token-id prompts, the sampling parameters of choice 0 (choice ``i`` of a
    prompt uses ``seed + i``), ``n`` choices per prompt, streaming, stop strings."""

    model: str
    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    stop: list[str] = field(default_factory=list)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _get(body: dict, name: str, default: Any, check, what: str) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise bad(name, f"{name} must be {what}, got {value!r}")
    return value


def _prompts(prompt: Any, tokenizer: Tokenizer) -> list[list[int]]:
    if prompt is None:
        raise bad("prompt", "prompt is required")
    if isinstance(prompt, str):
        items: list = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bad("prompt", "prompt must be a non-empty string, list of strings, list of token ids or list of lists")
    if len(items) > MAX_PROMPTS:
        raise bad("prompt", f"at most {MAX_PROMPTS} prompts per request, got {len(items)}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tokenizer.encode(item)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            ids = list(item)
        else:
            raise bad("prompt", f"prompt[{i}] must be a string or a list of token ids, got {type(item).__name__}")
        if not ids:
            raise bad("prompt", "prompt is empty" + ("" if len(items) == 1 else f" (prompt[{i}])"))
        out.append(ids)
    return out


def _refuse_unsupported(body: dict, n: int) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        value = body.get(name)
        if value is not None and value != 0:
            raise bad(name, f"{name} is not supported by this server (got {value!r}; use 0 or omit it)")
    if body.get("logprobs") not in (None, 0):
        raise bad("logprobs", "logprobs is not supported by this server")
    if body.get("echo") not in (None, False):
        raise bad("echo", "echo is not supported by this server")
    if body.get("suffix") is not None:
        raise bad("suffix", "suffix is not supported by this server")
    if body.get("logit_bias") not in (None, {}):
        raise bad("logit_bias", "logit_bias is not supported by this server")
    if body.get("best_of") not in (None, n):
        raise bad("best_of", f"best_of must equal n ({n}) on this server, got {body.get('best_of')!r}")


def parse_completion(body: Any, tokenizer: Tokenizer, model_name: str, eos_token_id: int | None) -> CompletionRequest:
    """Check a completions request body; raises :class:`APIError` naming the first bad field.

    The engine's own checks (context length, token ranges) run when the request is submitted.
    """
    if not isinstance(body, dict):
        raise bad("body", f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is None:
        raise bad("model", "model is required")
    if model != model_name:
        raise bad("model", f"unknown model {model!r}; this server serves {model_name!r}", code="model_not_found")
    n = _get(body, "n", 1, lambda v: _is_int(v) and 1 <= v <= MAX_N, f"an integer in [1, {MAX_N}]")
    _refuse_unsupported(body, n)
    max_tokens = _get(body, "max_tokens", 16, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    temperature = _get(body, "temperature", 1.0, lambda v: _is_number(v) and 0 <= v <= 2, "a number in [0, 2]")
    top_p = _get(body, "top_p", 1.0, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    top_k = _get(body, "top_k", 0, lambda v: _is_int(v) and v >= -1, "an integer >= 0 (0 or -1 disables it)")
    penalty = _get(body, "repetition_penalty", 1.0, lambda v: _is_number(v) and v > 0, "a number > 0")
    seed = _get(body, "seed", None, lambda v: _is_int(v) and -(2**63) <= v < 2**63, "a 64-bit integer")
    stream = _get(body, "stream", False, lambda v: isinstance(v, bool), "a boolean")
    ignore_eos = _get(body, "ignore_eos", False, lambda v: isinstance(v, bool), "a boolean")
    stop_ids = _get(body, "stop_token_ids", [], lambda v: isinstance(v, list) and all(map(_is_int, v)),
                    "a list of token ids")  # fmt: skip
    options = _get(body, "stream_options", {}, lambda v: isinstance(v, dict), "an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad("stream_options", f"stream_options.include_usage must be a boolean, got {include_usage!r}")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", f"stop must be a non-empty string or a list of them, got {body.get('stop')!r}")
    if len(stop) > MAX_STOP_STRINGS:
        raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    prompts = _prompts(body.get("prompt"), tokenizer)
    if eos_token_id is not None and not ignore_eos and eos_token_id not in stop_ids:
        stop_ids = [*stop_ids, eos_token_id]
    params = SamplingParams(max_tokens=max_tokens, temperature=float(temperature), top_k=max(top_k, 0),
                            top_p=float(top_p), repetition_penalty=float(penalty), seed=seed,
                            stop_token_ids=tuple(stop_ids))  # fmt: skip
    return CompletionRequest(model, prompts, params, n, stream, include_usage, stop)


def request_error(exc: RequestError) -> APIError:
    """An engine :class:`RequestError` as a 400."""
    return bad(exc.param or "body", str(exc), code="context_length_exceeded" if "context" in str(exc) else None)


class ChoiceText:
    """One choice's text, built from its tokens as they arrive (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self._decoder = tokenizer.stream_decoder()
        self.stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.finish_reason: str | None = None

    def feed(self, tokens: list[int], finish_reason: str | None) -> str:
        """Add a step's ``tokens`` (with the request's finish reason on its last step); returns the text that
        can be sent now.  Sets :attr:`finish_reason` when the choice ended, "stop" also when a stop string
        appeared (the caller then cancels the request)."""
        if self.finish_reason is not None:
            return ""
        if finish_reason == "stop":
            tokens = tokens[:-1]  # the stop token is not part of the text
        self.text += self._decoder.push(tokens)
        if finish_reason is not None:
            self.text += self._decoder.flush()
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            finish_reason = "stop"
        if finish_reason is not None:
            self.finish_reason = finish_reason
            piece, self._sent = self.text[self._sent :], len(self.text)
            return piece
        safe = max(self._sent, len(self.text) - self._hold)
        piece, self._sent = self.text[self._sent : safe], safe
        return piece


def completion_id() -> str:
    """A fresh ``cmpl-...`` id."""
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def choice(index: int, text: str, finish_reason: str | None) -> dict:
    """One entry of ``choices``."""
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def completion(cid: str, model: str, choices: list[dict], usage: dict | None, created: int | None = None) -> dict:
    """A ``text_completion`` object (a whole response, or one streamed chunk with ``usage=None``)."""
    out = {"id": cid, "object": "text_completion", "created": created or int(time.time()), "model": model,
           "choices": choices}  # fmt: skip
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
