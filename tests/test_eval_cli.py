"""``gpt2fast eval bleu`` on a tiny random model: the scores are sacrebleu's on the same strings, bad input exits 2
with one line, and the generation knobs reach generate."""

from __future__ import annotations

import json

import pytest
import torch

from gpt2fast import GPT2, GPT2Config, cli
from gpt2fast.tokenizer import Tokenizer

sacrebleu = pytest.importorskip("sacrebleu")

TINY = ["--random", "tiny"]
PROMPTS = ["The quick brown fox", "Hello world", "GPT-2 kernels are"]
REFS = ["jumps over the lazy dog", "and good morning", "fast on a GPU"]


def _files(tmp_path, prompts=PROMPTS, refs=REFS):
    p, r = tmp_path / "prompts.txt", tmp_path / "refs.txt"
    p.write_text("\n".join(prompts) + "\n")
    r.write_text("\n".join(refs) + "\n")
    return str(p), str(r)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("extra", [[], ["--num-beams", "2", "--length-penalty", "0.5", "--max-new-tokens", "5"]])
def test_bleu_equals_sacrebleu_on_the_same_strings(tmp_path, capsys, extra):
    p, r = _files(tmp_path)
    js = tmp_path / "out" / "bleu.json"
    code, out, err = run(capsys, "eval", "bleu", *TINY, "--prompts", p, "--references", r, "--ignore-eos",
                         "--max-new-tokens", "6", "--batch-size", "2", "--json", str(js), *extra)  # fmt: skip
    assert code == 0, err
    doc = json.loads(js.read_text())
    hyps = doc["hypotheses"]
    assert len(hyps) == 3 and doc["references"] == REFS
    assert doc["bleu"] == sacrebleu.corpus_bleu(hyps, [REFS]).score
    assert doc["chrf"] == sacrebleu.corpus_chrf(hyps, [REFS]).score
    assert "BLEU" in out and "chrF" in out and f"{doc['bleu']:.2f}" in out
    # the continuations are the model's own (batched, left-padded) generations
    tok, model = Tokenizer.default(), GPT2.random(GPT2Config.from_name("tiny"), seed=0)
    kw = dict(max_new_tokens=6, num_beams=1)
    if extra:
        kw.update(max_new_tokens=5, num_beams=2, length_penalty=0.5)
    ids = torch.tensor([tok.encode(PROMPTS[1])])
    assert hyps[1] == tok.decode(model.generate(ids, **kw)[0, ids.shape[1] :])


def test_bleu_of_the_references_themselves_is_100(tmp_path, capsys, monkeypatch):
    from gpt2fast.cli import eval as eval_cli

    monkeypatch.setattr(eval_cli, "continuations", lambda model, tok, prompts, kw, bs, gen: list(REFS))
    p, r = _files(tmp_path)
    js = tmp_path / "b.json"
    assert run(capsys, "eval", "bleu", *TINY, "--prompts", p, "--references", r, "--json", str(js))[0] == 0
    doc = json.loads(js.read_text())
    assert doc["bleu"] == pytest.approx(100.0) and doc["chrf"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", r"--prompts .*: no such file"),
        ("empty", r"--references .*: the file is empty"),
        ("mismatch", r"--prompts has 3 lines but --references has 2; they must match"),
        ("blank-prompt", r"--prompts line 2 is empty"),
        ("beams", r"--num-beams must be >= 1"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case, message):
    import re

    p, r = _files(tmp_path)
    extra = []
    if case == "missing":
        p = str(tmp_path / "nope.txt")
    elif case == "empty":
        (tmp_path / "refs.txt").write_text("")
    elif case == "mismatch":
        p, r = _files(tmp_path, refs=REFS[:2])
    elif case == "blank-prompt":
        p, r = _files(tmp_path, prompts=["a", " ", "c"])
    else:
        extra = ["--num-beams", "0"]
    code, out, err = run(capsys, "eval", "bleu", *TINY, "--prompts", p, "--references", r, *extra)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_generate_cli_beam_search_prints_the_best_beam(capsys):
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "Hello", "--max-new-tokens", "4", "--num-beams", "3",
                         "--ignore-eos")  # fmt: skip
    assert code == 0, err
    tok, model = Tokenizer.default(), GPT2.random(GPT2Config.from_name("tiny"), seed=0)
    ids = torch.tensor([tok.encode("Hello")])
    assert out == "Hello" + tok.decode(model.generate(ids, max_new_tokens=4, num_beams=3)[0, 1:]) + "\n"


def test_generate_cli_stop_string(capsys):
    tok, model = Tokenizer.default(), GPT2.random(GPT2Config.from_name("tiny"), seed=0)
    ids = torch.tensor([tok.encode("Hello")])
    free = model.generate(ids, max_new_tokens=6)[0, 1:].tolist()
    n = next((j for j in range(1, 6) if free[j] not in free[:j]), 0) + 1  # the first token new to the text ends it
    stop = tok.decode(free[n - 1 : n])
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "Hello", "--max-new-tokens", "6", "--stop", stop)
    assert code == 0, err
    assert out == "Hello" + tok.decode(free[:n]) + "\n" and f"{n} tokens in" in err
