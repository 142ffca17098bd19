"""The bad-input catalogue of the runtime (model, cache, generate, loading, tokenizer, command line), and the
generated document of every bad input, ``docs/bad_inputs.md``.

Every row names the input, the call that makes it, the exception type and a regex that must name the argument
and what was expected.  The ops' bad inputs are declared by each op's spec (``BadInput`` / ``EdgeInput`` in
``gpt2fast/ops/specs/``) and run for every registered backend by tests/test_ops_conformance.py, which also counts
that nothing reached a backend; here they only feed the document.  Model / generate / loading / tokenizer rows use
a tiny model (vocab 64, 32 positions); CLI rows run ``gpt2fast.cli.main([...])`` in-process and require exit
status 2 with a one-line message.

``docs/bad_inputs.md`` is generated from the specs and this table with the real messages; a test fails when the
committed file is stale.  Regenerate it with ``make docs`` (``GPT2FAST_UPDATE_DOCS=1`` on this test file).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gpt2fast import cli, ops
from gpt2fast.config import GPT2Config
from gpt2fast.loading import CheckpointError
from gpt2fast.model import GPT2
from gpt2fast.testing import conformance as cf
from gpt2fast.tokenizer import Tokenizer

META = torch.device("meta")  # stands in for "a second device": tensors there carry a device but no data
DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"

#: The tiny model every model/generate row uses: V=64, 32 positions, one layer, head dim 32.
TINY = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=1)


class CliUsageExit(Exception):
    """``cli.main`` returned exit status 2; the message is what it printed on stderr."""


# ----------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Case:
    """One bad input: ``call(ctx)`` triggers it; ``exc``/``match`` is what must be raised."""

    id: str
    input: str
    api: str
    call: Callable[[SimpleNamespace], object]
    exc: type[BaseException]
    match: str


def rn(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Random normal tensor."""
    return torch.randn(*shape).to(dtype=dtype, device=device)


def tiny_model() -> GPT2:
    """A fresh random tiny model on CPU (fp32, reference backend)."""
    return GPT2.random(TINY, seed=0, backend="reference")


def ids(b=2, t=5, high=64) -> torch.Tensor:
    """Random token ids [b, t] below ``high``."""
    return torch.randint(0, high, (b, t))


def prefilled(max_len=8, t=5) -> GPT2:
    """A tiny model whose cache (batch 2, ``max_len`` positions) holds a prompt of ``t`` tokens."""
    m = tiny_model()
    m.setup_cache(2, max_len)
    m.prefill(ids(2, t))
    return m


def prefill_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Prefill a tiny model's fresh cache (batch 2, 8 positions) with 5-token prompts of ``lengths``."""
    m = tiny_model()
    m.setup_cache(2, 8)
    return m.prefill(ids(2, 5), lengths)


def full_cache() -> GPT2:
    """A tiny model whose 8-position cache is full."""
    m = prefilled(8, 5)
    for _ in range(3):
        m.decode_step(torch.tensor([1, 2]))
    return m


def run_cli(ctx, *argv: str) -> int:
    """Run ``cli.main``; exit status 2 raises :class:`CliUsageExit` with stderr (which must be one line)."""
    code = cli.main(list(argv))
    err = ctx.capsys.readouterr().err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        raise CliUsageExit(" ".join(err.split()))
    return code


def _copy_checkpoint(ctx, name: str) -> Path:
    d = ctx.root / name
    d.mkdir(exist_ok=True)  # the doc's rows share one context: a second row builds the same directory again
    for f in ctx.ckpt.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    return d


def truncated_checkpoint(ctx) -> Path:
    """The tiny checkpoint with model.safetensors cut in half."""
    d = _copy_checkpoint(ctx, "truncated")
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return d


def corrupt_checkpoint(ctx) -> Path:
    """The tiny checkpoint with a model.safetensors of random bytes."""
    d = _copy_checkpoint(ctx, "corrupt")
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 8)
    return d


def disagreeing_checkpoint(ctx) -> Path:
    """The tiny checkpoint whose config.json says n_embd=64 (the weights are 32 wide)."""
    d = _copy_checkpoint(ctx, "disagree")
    cfg = json.loads((d / "config.json").read_text())
    cfg["n_embd"] = 64
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def no_config_checkpoint(ctx) -> Path:
    """The tiny checkpoint without config.json."""
    d = _copy_checkpoint(ctx, "noconfig")
    (d / "config.json").unlink()
    return d


def tokenizer_without_merges(ctx) -> Path:
    """A tokenizer directory holding vocab.json but no merges.txt."""
    d = ctx.root / "tok_no_merges"
    d.mkdir(exist_ok=True)
    (d / "vocab.json").write_text(json.dumps({"a": 0, "<|endoftext|>": 1}))
    return d


CASES: list[Case] = [
    # ---- model
    Case("fwd-float-ids", "float input_ids", "GPT2.forward", lambda c: tiny_model()(ids().float()),
         TypeError, r"input_ids must be an integer tensor, got torch\.float32"),
    Case("fwd-1d-ids", "1-D input_ids", "GPT2.forward", lambda c: tiny_model()(ids()[0]),
         ValueError, r"input_ids must be 2-D \[batch, seq\], got shape \[5\]"),
    Case("fwd-empty", "input_ids [2, 0]", "GPT2.forward", lambda c: tiny_model()(ids(2, 0)),
         ValueError, r"input_ids is empty \(shape \[2, 0\]\)"),
    Case("fwd-id-over-vocab", "id 64 with vocab 64", "GPT2.forward",
         lambda c: tiny_model()(torch.tensor([[1, 64]])),
         ValueError, r"input_ids contains id 64, outside the vocabulary \[0, 64\)"),
    Case("fwd-id-negative", "id -1", "GPT2.forward", lambda c: tiny_model()(torch.tensor([[-1, 3]])),
         ValueError, r"input_ids contains id -1, outside the vocabulary \[0, 64\)"),
    Case("fwd-too-long", "33 tokens with n_positions 32", "GPT2.forward", lambda c: tiny_model()(ids(1, 33)),
         ValueError, r"sequence length 33 exceeds n_positions=32"),
    Case("fwd-other-device", "input_ids on another device (meta)", "GPT2.forward",
         lambda c: tiny_model()(ids().to(META)), RuntimeError, r"input_ids is on meta but the model is on cpu"),
    Case("fwd-labels-list", "labels a list", "GPT2.forward",
         lambda c: tiny_model()(ids(), labels=ids().tolist()), TypeError, r"labels must be a torch\.Tensor, got list"),
    Case("fwd-labels-float", "float labels", "GPT2.forward", lambda c: tiny_model()(ids(), labels=ids().float()),
         TypeError, r"labels must be an integer tensor, got torch\.float32"),
    Case("fwd-labels-shape", "labels [2, 4] for input_ids [2, 5]", "GPT2.forward",
         lambda c: tiny_model()(ids(), labels=ids(2, 4)),
         ValueError, r"labels must have input_ids' shape \[2, 5\], got \[2, 4\]"),
    Case("fwd-labels-other-device", "labels on another device (meta)", "GPT2.forward",
         lambda c: tiny_model()(ids(), labels=ids().to(META)),
         RuntimeError, r"labels is on meta but input_ids is on cpu"),
    Case("model-backend-head-dim", "GPT2(head dim 8, backend='triton')", "GPT2",
         lambda c: GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2), backend="triton"),
         ValueError, r"backend 'triton' cannot run this model: triton attention supports head dims \(32, 64, 128\)"),
    Case("model-backend-unknown", "GPT2(backend='nope')", "GPT2", lambda c: GPT2(TINY, backend="nope"),
         ValueError, r"unknown backend 'nope'"),
    Case("cache-too-long", "setup_cache(max_len=33) with n_positions 32", "GPT2.setup_cache",
         lambda c: tiny_model().setup_cache(2, 33), ValueError, r"max_len must be in \[1, n_positions=32\], got 33"),
    Case("cache-batch0", "setup_cache(batch_size=0)", "GPT2.setup_cache", lambda c: tiny_model().setup_cache(0, 8),
         ValueError, r"batch_size must be >= 1, got 0"),
    Case("prefill-no-cache", "prefill before setup_cache", "GPT2.prefill", lambda c: tiny_model().prefill(ids()),
         RuntimeError, r"call setup_cache\(2, max_len\) before prefill"),
    Case("prefill-too-long", "prompt of 10 into an 8-position cache", "GPT2.prefill",
         lambda c: prefilled(8, 10), ValueError, r"prompt length 10 exceeds the cache's max_len 8"),
    Case("prefill-length0", "lengths [0, 5]", "GPT2.prefill",
         lambda c: prefill_lengths(torch.tensor([0, 5])),
         ValueError, r"lengths must lie in \[1, 5\], got \[0, 5\]"),
    Case("decode-no-cache", "decode_step before setup_cache", "GPT2.decode_step",
         lambda c: tiny_model().decode_step(torch.tensor([1, 2])), RuntimeError, r"call setup_cache\(B, max_len\)"),
    Case("decode-float-tokens", "float tokens", "GPT2.decode_step",
         lambda c: prefilled().decode_step(torch.tensor([1.0, 2.0])),
         ValueError, r"tokens must be integer ids \[2\], got torch\.float32 \[2\]"),
    Case("decode-full", "decode_step on a full cache", "GPT2.decode_step",
         lambda c: full_cache().decode_step(torch.tensor([1, 2])),
         ValueError, r"the KV cache is full \(8 positions\)"),
    # ---- generate
    Case("gen-zero-new", "max_new_tokens=0", "GPT2.generate", lambda c: tiny_model().generate(ids(), max_new_tokens=0),
         ValueError, r"max_new_tokens must be >= 1, got 0"),
    Case("gen-past-context", "prompt 30 + 3 new > n_positions 32", "GPT2.generate",
         lambda c: tiny_model().generate(ids(1, 30), max_new_tokens=3),
         ValueError, r"prompt length 30 \+ max_new_tokens 3 exceeds the model's n_positions=32"),
    Case("gen-top-p-0", "top_p=0", "GPT2.generate", lambda c: tiny_model().generate(ids(), do_sample=True, top_p=0.0),
         ValueError, r"top_p must lie in \(0, 1\], got 0\.0"),
    Case("gen-temp-0", "temperature=0 with do_sample", "GPT2.generate",
         lambda c: tiny_model().generate(ids(), do_sample=True, temperature=0.0),
         ValueError, r"temperature must be > 0 when do_sample=True, got 0\.0"),
    Case("gen-temp-nan", "temperature=nan", "GPT2.generate",
         lambda c: tiny_model().generate(ids(), temperature=math.nan),
         TypeError, r"temperature must be a finite number, got nan"),
    Case("gen-top-k-neg", "top_k=-1", "GPT2.generate", lambda c: tiny_model().generate(ids(), top_k=-1),
         ValueError, r"top_k must be >= 0 \(0 disables it\), got -1"),
    Case("gen-right-padded", "right-padded attention_mask", "GPT2.generate",
         lambda c: tiny_model().generate(ids(2, 3), torch.tensor([[1, 1, 1], [1, 1, 0]])),
         ValueError, r"attention_mask must be left-padded"),
    Case("gen-eos-over-vocab", "eos_token_id 64 with vocab 64", "GPT2.generate",
         lambda c: tiny_model().generate(ids(), eos_token_id=64),
         ValueError, r"eos_token_id must be in \[0, 64\), got 64"),
    Case("gen-generator-type", "generator=42", "GPT2.generate", lambda c: tiny_model().generate(ids(), generator=42),
         TypeError, r"generator must be a torch\.Generator, got int"),
    # ---- loading
    Case("load-truncated", "model.safetensors cut in half", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(truncated_checkpoint(c), quiet=True),
         CheckpointError, r"model\.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"),
    Case("load-corrupt", "model.safetensors of random bytes", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(corrupt_checkpoint(c), quiet=True),
         CheckpointError, r"model\.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"),
    Case("load-config-disagrees", "config.json says n_embd=64, weights are 32 wide", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(disagreeing_checkpoint(c), quiet=True),
         CheckpointError, r"tensor 'transformer\.\S+' has shape \[[\d, ]+\] in the checkpoint, expected \[[\d, ]+\]"),
    Case("load-no-config", "checkpoint directory without config.json", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(no_config_checkpoint(c), quiet=True),
         FileNotFoundError, r"no config\.json at .*noconfig"),
    Case("load-no-weights", "directory with no weight file", "GPT2.from_pretrained",
         lambda c: GPT2.from_pretrained(c.root, quiet=True),
         CheckpointError, r"holds neither model\.safetensors nor pytorch_model\.bin"),
    # ---- tokenizer
    Case("tok-missing-merges", "tokenizer directory without merges.txt", "Tokenizer.from_pretrained",
         lambda c: Tokenizer.from_pretrained(tokenizer_without_merges(c)),
         FileNotFoundError, r"no tokenizer in .*: need tokenizer\.json, or vocab\.json \+ merges\.txt "
         r"\(missing merges\.txt\)"),
    Case("tok-decode-over-vocab", "decode id 50257", "Tokenizer.decode",
         lambda c: Tokenizer.default().decode([50257]), ValueError, r"ids must be ints in \[0, 50257\), got 50257"),
    Case("tok-encode-bytes", "encode(b'hi')", "Tokenizer.encode", lambda c: Tokenizer.default().encode(b"hi"),
         TypeError, r"text must be a str, got bytes"),
    Case("tok-token-bytes-over-vocab", "token_bytes(50257)", "Tokenizer.token_bytes",
         lambda c: Tokenizer.default().token_bytes(50257), ValueError, r"token_id must be in \[0, 50257\), got 50257"),
    Case("tok-token-bytes-float", "token_bytes(1.5)", "Tokenizer.token_bytes",
         lambda c: Tokenizer.default().token_bytes(1.5), TypeError, r"token_id must be an int, got 1\.5"),
    # ---- command line (exit status 2 and a one-line message)
    Case("cli-top-p", "generate --top-p 0", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--random", "tiny", "--top-p", "0"),
         CliUsageExit, r"invalid sampling settings: top_p must lie in \(0, 1\], got 0\.0"),
    Case("cli-temp-nan", "generate --temperature nan", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--random", "tiny", "--temperature", "nan"),
         CliUsageExit, r"temperature must be a finite number, got nan"),
    Case("cli-past-context", "generate --max-new-tokens 200 (tiny: n_positions 128)", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--random", "tiny", "--max-new-tokens", "200"),
         CliUsageExit, r"max_new_tokens 200 exceeds the model's n_positions=128"),
    Case("cli-corrupt-model", "generate --model DIR with a corrupt model.safetensors", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--model", str(corrupt_checkpoint(c))),
         CliUsageExit, r"not a readable safetensors file \(truncated or corrupt\?\)"),
    Case("cli-missing-tokenizer", "generate --tokenizer DIR without merges.txt", "gpt2fast generate",
         lambda c: run_cli(c, "generate", "--random", "tiny", "--tokenizer", str(tokenizer_without_merges(c))),
         CliUsageExit, r"no tokenizer in .* \(missing merges\.txt\)"),
]  # fmt: skip


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def files(tmp_path_factory) -> SimpleNamespace:
    """A tiny saved checkpoint (``ckpt``), copied and broken by the loading rows."""
    ckpt = tmp_path_factory.mktemp("catalogue") / "ckpt"
    tiny_model().save_pretrained(ckpt)
    return SimpleNamespace(ckpt=ckpt)


def _ctx(files, capsys, tmp_path) -> SimpleNamespace:
    return SimpleNamespace(capsys=capsys, root=tmp_path, ckpt=files.ckpt)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, files, capsys, tmp_path):
    """Each bad input raises its exception with a message naming the argument."""
    torch.manual_seed(1)
    with pytest.raises(case.exc, match=case.match):
        case.call(_ctx(files, capsys, tmp_path))


def test_catalogue_size_and_coverage():
    """Every public entry point of the runtime has rows, and every op spec declares bad inputs."""
    apis = {c.api for c in CASES}
    needed = {"GPT2.forward", "GPT2.prefill", "GPT2.decode_step", "GPT2.setup_cache", "GPT2.generate"}
    assert needed | {"GPT2.from_pretrained", "Tokenizer.from_pretrained", "gpt2fast generate"} <= apis
    assert all(spec.bad_inputs and spec.edge_inputs for spec in ops.specs())
    assert len(CASES) + sum(len(s.bad_inputs) + len(s.edge_inputs) for s in ops.specs()) >= 84


# ----------------------------------------------------------------------------- docs/bad_inputs.md
def _message(exc: BaseException, root: Path) -> str:
    text = " ".join(str(exc).split()).replace(str(root), "DIR")
    text = re.sub(r"/tmp/\S*?/(catalogue\d*/)?", "DIR/", text)
    return text.replace("|", "\\|")


def _raised(call, root: Path, exc_type: type[BaseException], match: str) -> str:
    """The row's exception and message; it must be the one the row declares (as its test checks), so that the
    document never shows an accident of how it was generated."""
    try:
        call()
    except Exception as exc:
        if not isinstance(exc, exc_type) or not re.search(match, str(exc)):
            raise AssertionError(f"expected {exc_type.__name__} matching {match!r}, got {exc!r}") from exc
        return f"`{type(exc).__name__}`: {_message(exc, root)}"
    raise AssertionError("the call raised nothing")


def _op_rows(root: Path) -> list[str]:
    rows = []
    backends = ops.backend_names()
    for spec in ops.specs():
        for bad in spec.bad_inputs:
            torch.manual_seed(1)
            msg = _raised(lambda bad=bad, spec=spec: spec.call(bad.make()), root, bad.exc, bad.match)
            rows.append((f"`ops.{spec.name}`", bad.input, f"{msg} — every backend, before dispatch"))
        for edge in spec.edge_inputs:
            torch.manual_seed(1)
            verdicts = []
            for be in backends:
                reason = cf.edge_verdict(spec, edge, be)
                if reason is None:
                    verdicts.append(f"**{be}**: runs it (= reference)")
                else:
                    verdicts.append(f"**{be}**: `UnsupportedInputError`: {_message(Exception(reason), root)}")
            verdicts.append("**auto**: falls through to the first backend that runs it")
            rows.append((f"`ops.{spec.name}`", edge.input, "<br>".join(verdicts)))
    return rows


def render_doc(files, capsys, tmp_path) -> str:
    """The markdown of docs/bad_inputs.md, with the messages the calls raise now."""
    rows = _op_rows(tmp_path)
    ctx = _ctx(files, capsys, tmp_path)
    for case in CASES:
        torch.manual_seed(1)
        msg = _raised(lambda case=case: case.call(ctx), tmp_path, case.exc, case.match)
        rows.append((f"`{case.api}`", case.input, msg))
    lines = [
        "# Bad input: what each one raises",
        "",
        "Generated by `make docs` from the op specs (`gpt2fast/ops/specs/*.py`: `BAD_INPUTS`, `EDGE_INPUTS`) and",
        "the runtime table in `tests/test_bad_input_catalogue.py`; `tests/test_bad_input_catalogue.py::"
        "test_doc_is_current` fails when this file is stale.  Messages are the real ones (temporary paths shown as",
        "`DIR`).",
        "",
        "* Op rows marked *every backend, before dispatch* are refused by the op's shared validation before any",
        "  backend is reached; `tests/test_ops_conformance.py` checks that for every registered backend, counting",
        "  that no implementation was called.",
        "* The other op rows are valid inputs that a backend may decline through its `supports` predicate (shapes,",
        "  dtypes and strides only): a call naming that backend raises `UnsupportedInputError` with the reason",
        '  before any launch, and `backend="auto"` falls through to the next backend.  A backend that runs the',
        "  input must match the reference (checked wherever the backend is available; the cuda verdicts come from",
        "  its layout checks, which run on CPU).",
        "* Runtime rows (model, generate, loading, tokenizer, CLI) use a tiny model; CLI rows exit with status 2 and",
        "  a one-line message.",
        "",
        f"{len(rows)} rows.",
        "",
        "| # | API | Bad input | Exception: message |",
        "|---|---|---|---|",
    ]
    lines += [f"| {i} | {api} | {what} | {msg} |" for i, (api, what, msg) in enumerate(rows, 1)]
    return "\n".join(lines) + "\n"


def test_doc_is_current(files, capsys, tmp_path):
    """docs/bad_inputs.md equals what the specs and this table generate (``make docs`` rewrites it)."""
    text = render_doc(files, capsys, tmp_path)
    if os.environ.get("GPT2FAST_UPDATE_DOCS") == "1":
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.is_file(), "docs/bad_inputs.md is missing: run `make docs`"
    assert DOC.read_text() == text, "docs/bad_inputs.md is stale: run `make docs` and commit it"
