"""The ``gpt2fast`` command line, run in-process through ``main([...])`` on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gpt2fast import cli, ops
from gpt2fast.model import GPT2
from gpt2fast.tokenizer import Tokenizer

TINY = ["--random", "tiny"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_greedy(prompt: str, n: int, seed: int = 0) -> str:
    """The text the tiny model continues ``prompt`` with, through the Python API."""
    tok = Tokenizer.default()
    model = GPT2.random(cli.size_config("tiny"), seed=seed)
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=n)
    return tok.decode(out[0, ids.shape[1] :])


# ---- generate ---------------------------------------------------------------------------
def test_generate_streams_the_greedy_continuation(capsys):
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "Hello world", "--max-new-tokens", "6", "--ignore-eos")
    assert code == 0, err
    assert out == "Hello world" + expected_greedy("Hello world", 6) + "\n"
    assert "6 tokens in" in err and "tokens/s" in err


def test_generate_sampling_is_seeded(capsys):
    argv = ["generate", *TINY, "--do-sample", "--top-k", "50", "--top-p", "0.9", "--temperature", "1.5"]
    argv += ["--repetition-penalty", "1.2", "--no-repeat-ngram-size", "2", "--max-new-tokens", "8", "--ignore-eos"]
    first = run(capsys, *argv, "--seed", "1")
    again = run(capsys, *argv, "--seed", "1")
    other = run(capsys, *argv, "--seed", "2")
    assert first[0] == again[0] == other[0] == 0
    assert first[1] == again[1]
    assert first[1] != other[1]  # 8 tokens from a flat 50257-way distribution: a collision is ~impossible


def test_generate_stops_at_eos(capsys, monkeypatch):
    tok = Tokenizer.default()
    hello, world = tok.encode("Hello world")
    steps = [hello, world, tok.eos_token_id, hello]

    def fake_stream(self, input_ids, attention_mask=None, **kwargs):
        assert kwargs["eos_token_id"] == tok.eos_token_id
        return iter(torch.tensor([t]) for t in steps)

    monkeypatch.setattr(GPT2, "generate_stream", fake_stream)
    code, out, err = run(capsys, "generate", *TINY, "--prompt", ">", "--max-new-tokens", "4")
    assert code == 0, err
    assert out == ">Hello world\n"
    assert "3 tokens in" in err


def test_generate_from_checkpoint_dir(tmp_path, capsys):
    GPT2.random(cli.size_config("tiny"), seed=0).save_pretrained(tmp_path)
    code, out, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3")
    assert code == 0, err
    assert out.startswith("Hi")


# ---- info -------------------------------------------------------------------------------
def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    for word in ("torch", "triton", "transformers", "gpt2fast._C", "backends", "reference", "cpu", "cuda"):
        assert word in out


# ---- parity -----------------------------------------------------------------------------
def test_parity_passes_on_tiny_model(tmp_path, capsys):
    path = tmp_path / "parity.json"
    argv = ["parity", *TINY, "--backend", "reference", "--batch", "2", "--seq-len", "6", "--json", str(path)]
    code, out, err = run(capsys, *argv)
    assert code == 0, out + err
    doc = json.loads(path.read_text())
    assert doc["ok"] is True
    combos = {(r["dtype"], r["path"]) for r in doc["results"]}
    assert combos == {(d, p) for d in ("fp32", "fp16", "bf16") for p in ("forward", "decode")}
    assert all(r["err"] <= r["bound"] for r in doc["results"])
    assert "parity ok" in out


def test_parity_default_backends_are_the_available_ones():
    names = cli._parity_backends(None, torch.device("cpu"))
    assert "reference" in names
    assert names == [name for name, ok, _ in cli.backend_rows("cpu") if ok]


def _broken_bias_gelu(x, bias):
    return x + bias  # forgot the GELU


def _broken_decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    return torch.zeros_like(q)  # attends to nothing


@pytest.mark.parametrize(
    ("op", "broken", "failing_paths"),
    [
        ("bias_gelu", _broken_bias_gelu, {"forward", "decode"}),
        ("decode_attention", _broken_decode_attention, {"decode"}),
    ],
)
def test_parity_fails_on_a_broken_op(tmp_path, capsys, monkeypatch, op, broken, failing_paths):
    monkeypatch.setattr(ops.reference, op, broken)
    path = tmp_path / "parity.json"
    argv = ["parity", *TINY, "--dtype", "fp32", "--backend", "reference", "--seq-len", "8", "--json", str(path)]
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert "parity FAILED" in err
    doc = json.loads(path.read_text())
    assert doc["ok"] is False
    assert {r["path"] for r in doc["results"] if not r["ok"]} == failing_paths


# ---- errors -----------------------------------------------------------------------------
BAD = [
    (["generate", "--random", "gpt3"], "invalid choice: 'gpt3'"),
    (["generate", "--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
    (["generate"], "one of the arguments --model --random is required"),
    (["generate", *TINY, "--model", "x"], "not allowed with argument"),
    (["generate", *TINY, "--do-sample", "--temperature", "0"], "temperature must be > 0"),
    (["generate", *TINY, "--top-p", "1.5"], "top_p must lie in (0, 1]"),
    (["generate", *TINY, "--top-k", "-1"], "top_k must be >= 0"),
    (["generate", *TINY, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["generate", *TINY, "--max-new-tokens", "1000"], "exceeds the model's n_positions=128"),
    (["generate", *TINY, "--prompt", ""], "--prompt is empty"),
    (["generate", *TINY, "--device", "tpu"], "invalid --device 'tpu'"),
    (["generate", *TINY, "--dtype", "fp8"], "invalid choice: 'fp8'"),
    (["generate", *TINY, "--tokenizer", "/no/tok"], "tokenizer directory not found"),
    (["parity", *TINY, "--seq-len", "500"], "exceeds the model's n_positions=128"),
    (["parity", "--model", "/no/such/dir"], "no such directory"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) or "<none>" for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err + out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(capsys):
    code, _, err = run(capsys, "generate", *TINY, "--device", "cuda")
    assert code == 2 and "CUDA is not available" in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0
    assert "--no-repeat-ngram-size" in out


# ---- bench wiring -----------------------------------------------------------------------
def test_bench_unavailable_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gpt2fast.bench.cli", None)  # makes the import fail
    code, _, err = run(capsys, "bench", "kernels")
    assert code == 2
    assert "bench is unavailable" in err


def test_bench_is_wired_when_present(capsys):
    pytest.importorskip("gpt2fast.bench.cli")
    code, out, _ = run(capsys, "bench", "--help")
    assert code == 0
    assert "kernels" in out and "e2e" in out


# ---- python -m gpt2fast -----------------------------------------------------------------
def test_python_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2fast", "generate", "--random", "nope"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr
