"""The shipped default model (gpt2fast/assets/default, ``GPT2.from_pretrained("default")``): its files and size, its
recorded figures, readable output, and the parity checks on its trained weights (model logits against transformers,
and every op on the activations the model really produces, per backend and dtype)."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from _backends import DEVICE
from safetensors import safe_open

from gpt2fast import cli, ops
from gpt2fast.loading import CheckpointError, default_model_dir
from gpt2fast.model import GPT2
from gpt2fast.ops._registry import _impls, _memo, backend_names
from gpt2fast.parity import DTYPES, run_parity
from gpt2fast.testing import as_list, clone_inputs, fa_check, upcast
from gpt2fast.tokenizer import Tokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
ASSETS = default_model_dir()

#: From Macbeth, one of the works held out of training (modern edition of the package's corpus).
HELD_OUT_PASSAGE = (
    "To-morrow, and to-morrow, and to-morrow,\nCreeps in this petty pace from day to day,\n"
    "To the last syllable of recorded time;\nAnd all our yesterdays have lighted fools\n"
    "The way to dusty death. Out, out, brief candle!\nLife's but a walking shadow; a poor player,\n"
    "That struts and frets his hour upon the stage,\nAnd then is heard no more: it is a tale\n"
    "Told by an idiot, full of sound and fury,\nSignifying nothing.\n"
)


@pytest.fixture(scope="module")
def model() -> GPT2:
    return GPT2.from_pretrained("default", dtype=torch.float32)


def passage_ids(n: int | None = None) -> torch.Tensor:
    ids = Tokenizer.default().encode(HELD_OUT_PASSAGE)
    return torch.tensor([ids[:n] if n else ids])


# ---- the files -----------------------------------------------------------------------------------------------
def test_shipped_files_and_size():
    names = {p.name for p in ASSETS.iterdir()}
    wanted = {"config.json", "model.safetensors", "train_log.jsonl", "loss_curve.png", "train_summary.json"}
    assert wanted | {"perplexity.json", "corpus.json", "README.md"} <= names
    size = (ASSETS / "model.safetensors").stat().st_size
    assert size <= 20e6, f"{size / 1e6:.1f} MB"
    with safe_open(str(ASSETS / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert {f.get_slice(k).get_dtype() for k in names} == {"F16"}
    cfg = json.loads((ASSETS / "config.json").read_text())
    assert (cfg["vocab_size"], cfg["n_layer"], cfg["n_embd"], cfg["n_positions"]) == (50257, 4, 128, 256)


def test_package_data_ships_every_asset():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["gpt2fast"]
    for p in ASSETS.iterdir():
        rel = p.relative_to(ROOT / "gpt2fast").as_posix()
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), rel


def test_recorded_perplexity_beats_the_unigram_baseline():
    doc = json.loads((ASSETS / "perplexity.json").read_text())
    assert doc["dtype"] == "fp32" and (doc["max_length"], doc["stride"]) == (256, 128)
    assert doc["perplexity"] < doc["unigram"]["perplexity"] / 3, doc
    evals = [
        r["val_loss"] for r in map(json.loads, (ASSETS / "train_log.jsonl").read_text().splitlines()) if "val_loss" in r
    ]
    summary = json.loads((ASSETS / "train_summary.json").read_text())
    assert summary["val_loss"] == evals[-1] < evals[0] - 4  # from ~ln(50257) = 10.8 nats at step 0
    corpus = json.loads((ASSETS / "corpus.json").read_text())
    assert "macbeth" in corpus["val"] and "macbeth" not in corpus["train"]


def test_default_name_and_a_missing_install(monkeypatch, tmp_path):
    assert GPT2.from_pretrained("default").config.n_embd == 128
    monkeypatch.setattr("gpt2fast.loading.default_model_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="the default model is not installed"):
        GPT2.from_pretrained("default")


# ---- what it says --------------------------------------------------------------------------------------------
def whole_word_share(text: str) -> float:
    """The share of the text's words that GPT-2's vocabulary holds as one token " word" (or "word" at a line
    start): high for real English words, low for the run-together sub-token salad of a random model."""
    tok = Tokenizer.default()
    words = re.findall(r"[A-Za-z]+", text)
    whole = sum(len(tok.encode(" " + w)) == 1 or len(tok.encode(w)) == 1 for w in words)
    return whole / max(1, len(words))


def test_it_writes_english_words(model):
    tok = Tokenizer.default()
    prompt = torch.tensor([tok.encode("KING.\nWhat says the")])
    gen = torch.Generator().manual_seed(0)
    out = model.generate(prompt, max_new_tokens=60, do_sample=True, top_k=40, temperature=0.8, generator=gen)
    text = tok.decode(out[0, prompt.shape[1] :])
    assert len(re.findall(r"[A-Za-z]+", text)) >= 25, text
    assert whole_word_share(text) >= 0.9, text
    # The measure can fail: uniformly random tokens score 0.66-0.76 over 300 tokens (seeds 0-19), below the bar
    random_text = tok.decode(torch.randint(0, 50257, (300,), generator=torch.Generator().manual_seed(1)))
    assert whole_word_share(random_text) < 0.85


def test_held_out_passage_perplexity(model):
    from gpt2fast.perplexity import sliding_window_perplexity

    ppl = sliding_window_perplexity(model, passage_ids()).perplexity
    assert ppl < 400, ppl  # GPT-2's vocabulary is 50257; the unigram baseline is in the thousands


def test_cli_generate_and_eval_use_it(tmp_path, capsys):
    argv = ["generate", "--model", "default", "--prompt", "ROMEO.", "--max-new-tokens", "12", "--ignore-eos"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("ROMEO.") and len(out) > len("ROMEO.") + 12
    text = tmp_path / "passage.txt"
    text.write_text(HELD_OUT_PASSAGE)
    assert cli.main(["eval", "perplexity", "--data", str(text)]) == 0  # no --model: the default model
    assert "perplexity" in capsys.readouterr().out


# ---- parity on trained weights -------------------------------------------------------------------------------
def _available_backends() -> list[str]:
    return [b for b in backend_names() if ops.backend_status(b, DEVICE).available]


def test_model_parity_against_transformers():
    """``gpt2fast parity --model default``'s checks: full forward and cached decode logits on a held-out passage,
    against transformers in fp32 (FlashAttention rule), for every available backend and dtype.  Without a GPU the
    Triton interpreter takes ~15 s per dtype here, so it runs fp16 only (the op test below covers its other dtypes
    on the same weights)."""
    pytest.importorskip("transformers")
    ids, device = passage_ids(24), torch.device(DEVICE)
    rows = []
    for backend in _available_backends():
        interpreted = backend == "triton" and DEVICE == "cpu"
        rows += run_parity(ASSETS, ids, ["fp16"] if interpreted else list(DTYPES), [backend], device, 2)
    assert rows and all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert all(r.greedy_agree >= 0.95 for r in rows if r.dtype == "fp32"), rows


def _record_reference_calls(model: GPT2, ids: torch.Tensor) -> dict[str, list[tuple]]:
    """The arguments of every op call of one fp32 forward of ``model`` on ``ids``, by op (the reference backend
    runs them; each implementation is wrapped for the duration, as ``count_dispatches`` does)."""
    calls: dict[str, list[tuple]] = {}
    saved = dict(_impls)

    def recording(op, fn):
        def wrapper(*args):
            calls.setdefault(op, []).append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
            return fn(*args)

        return wrapper

    for (op, backend), impl in saved.items():
        _impls[(op, backend)] = dataclasses.replace(impl, fn=recording(op, impl.fn))
    _memo.clear()
    try:
        model.backend = "reference"
        with torch.no_grad():
            model(ids)
    finally:
        _impls.clear()
        _impls.update(saved)
        _memo.clear()
    return calls


def test_ops_on_trained_activations(model):
    """Every op the model calls, on the inputs the trained model really gives it (its LayerNorm rows, GELU inputs,
    attention q/k/v), on every available backend and dtype, against the oracle (FlashAttention rule)."""
    calls = _record_reference_calls(model, passage_ids(64))
    assert {"layer_norm", "bias_gelu", "attention"} <= calls.keys()
    checked = 0
    for op, arg_lists in calls.items():
        spec = ops.get_spec(op)
        for args in arg_lists[:: max(1, len(arg_lists) // 3)]:  # a few calls per op: first, middle, last layers
            inputs = dict(zip(spec.args, args))
            for dtype in spec.dtypes:
                cast = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                        for k, v in inputs.items()}  # fmt: skip
                ref32 = spec.run_reference(upcast(clone_inputs(cast)))
                base = spec.run_reference(clone_inputs(cast))
                for backend in _available_backends():
                    if (op, backend) not in _impls:
                        continue
                    out = as_list(spec.call(clone_inputs(cast), backend))
                    for o, r, b in zip(out, ref32, base):
                        res = fa_check(o, r, b)
                        assert res.ok, f"{op} on {backend} ({dtype}): {res}"
                    checked += 1
    assert checked >= 9


# ---- generation on trained weights ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_default():
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2LMHeadModel.from_pretrained(str(ASSETS), dtype=torch.float32).eval()


def _left_padded(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = Tokenizer.default().encode_batch(texts)
    return batch.input_ids, batch.attention_mask


@pytest.mark.parametrize(
    "num_beams, length_penalty, early_stopping", [(2, 0.5, True), (3, 1.0, False), (5, 2.0, "never"), (3, 2.0, True)]
)
def test_beam_search_matches_transformers(model, hf_default, num_beams, length_penalty, early_stopping):
    """Beam search on the trained weights, left-padded real prompts, a mid-beam EOS and several returned
    sequences: token-identical to transformers, sequences_scores within 1e-5 (fp32)."""
    from test_beam import _hf, _mid_beam_eos, _ours, assert_same

    ids, mask = _left_padded(["KING.\nWhat says the", "ROMEO.\nO"])
    kw = dict(max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
              num_return_sequences=2, eos_token_id=_mid_beam_eos(model, ids, mask, num_beams, 10))  # fmt: skip
    assert_same(_ours(model, ids, mask, **kw), _hf(hf_default, ids, mask, **kw), str(kw))


@pytest.mark.parametrize(
    "knobs",
    [dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2), dict(min_new_tokens=12, eos_token_id=198),
     dict(bad_words_ids=[[198], [11]])],
)  # fmt: skip
def test_greedy_processors_match_transformers(model, hf_default, knobs):
    """Processors in greedy mode on the trained weights (whose distributions are far from flat): the same tokens
    as transformers."""
    ids, mask = _left_padded(["KING.\nWhat says the", "ROMEO.\nO"])
    kw = dict(max_new_tokens=16, pad_token_id=50256, **knobs)
    kw.setdefault("eos_token_id", None)
    ours = model.generate(ids, mask, **kw)
    with torch.no_grad():
        ref = hf_default.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(ours, ref), (knobs, ours, ref)
