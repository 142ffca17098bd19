"""The ``gpt2fast`` command line, run in-process through ``main([...])`` on a tiny random model."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import pytest
import torch

from gpt2fast import GPT2Config, cli, ops
from gpt2fast.bench.results import load_json
from gpt2fast.cli import info
from gpt2fast.cli import parity as parity_cli
from gpt2fast.model import GPT2
from gpt2fast.ops._registry import dispatch
from gpt2fast.ops._spec import OpSpec
from gpt2fast.tokenizer import Tokenizer

TINY = ["--random", "tiny"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_greedy(prompt: str, n: int, seed: int = 0) -> str:
    """The text the tiny model continues ``prompt`` with, through the Python API."""
    tok = Tokenizer.default()
    model = GPT2.random(GPT2Config.from_name("tiny"), seed=seed)
    ids = torch.tensor([tok.encode(prompt)])
    out = model.generate(ids, max_new_tokens=n)
    return tok.decode(out[0, ids.shape[1] :])


# ---- generate ---------------------------------------------------------------------------
def test_generate_streams_the_greedy_continuation(capsys):
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "Hello world", "--max-new-tokens", "6", "--ignore-eos")
    assert code == 0, err
    assert out == "Hello world" + expected_greedy("Hello world", 6) + "\n"
    assert "6 tokens in" in err and "tokens/s" in err
    if not torch.cuda.is_available():  # "auto" on CPU tensors: the cpu backend's ops, reference for the rest
        assert re.search(r"backend auto: cpu \([^)]*\blayer_norm\b[^)]*\), reference \(the other \d+ ops\)", err), err


def test_generate_on_a_named_backend(capsys):
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "Hi", "--max-new-tokens", "2", "--backend", "reference")
    assert code == 0, err
    assert out == "Hi" + expected_greedy("Hi", 2) + "\n"
    assert "backend reference)" in err


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
    GPT2.random(GPT2Config.from_name("tiny"), seed=0).save_pretrained(tmp_path)
    code, out, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "3")
    assert code == 0, err
    assert out.startswith("Hi")


# ---- info -------------------------------------------------------------------------------
def test_info(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0
    for word in ("torch", "triton", "transformers", "gpt2fast._C", "backends", "reference", "cpu", "cuda"):
        assert word in out
    assert "implementations" in out
    for spec in ops.specs():
        assert spec.name in out


@pytest.fixture
def toy_backend():
    """A backend registered at run time: unavailable everywhere, implementing layer_norm only."""
    ops.register_backend("toyback", priority=5, is_available=lambda device: "a toy that never runs")
    ops.register_impl("layer_norm", "toyback")(lambda x, weight, bias, eps, residual: None)
    yield "toyback"
    ops.unregister_backend("toyback")


def test_info_lists_every_registered_backend_with_its_reason(capsys, toy_backend):
    rows = info.backend_rows("cpu")
    assert [name for name, _, _ in rows] == ops.backend_names()
    assert ("toyback", False, "a toy that never runs") in rows
    code, out, _ = run(capsys, "info")
    assert code == 0
    assert "toyback" in out and "a toy that never runs" in out


# ---- parity -----------------------------------------------------------------------------
def test_parity_passes_on_tiny_model(tmp_path, capsys):
    path = tmp_path / "parity.json"
    argv = ["parity", *TINY, "--backend", "reference", "--no-ops", "--batch", "2", "--seq-len", "6"]
    code, out, err = run(capsys, *argv, "--json", str(path))
    assert code == 0, out + err
    doc = json.loads(path.read_text())
    assert doc["ok"] is True and doc["ops"] == [] and doc["model"] == "random:tiny"
    assert (doc["batch"], doc["seq_len"], doc["decode_steps"]) == (2, 6, 4)
    combos = {(r["dtype"], r["path"]) for r in doc["results"]}
    assert combos == {(d, p) for d in ("fp32", "fp16", "bf16") for p in ("forward", "decode")}
    assert all(r["err"] <= r["bound"] for r in doc["results"])
    assert "parity ok" in out and "gpt2fast vs transformers" in out and "ops vs their reference" not in out


def test_parity_of_the_ops_needs_no_model(tmp_path, capsys):
    path = tmp_path / "parity.json"
    argv = ["parity", "--backend", "reference", "--op", "bias_gelu", "--op", "layer_norm", "--dtype", "fp16"]
    code, out, err = run(capsys, *argv, "--json", str(path))
    assert code == 0, out + err
    doc = json.loads(path.read_text())
    assert doc["ok"] is True and doc["model"] is None and doc["results"] == []
    assert {r["op"] for r in doc["ops"]} == {"bias_gelu", "layer_norm"}
    n_shapes = sum(len(ops.get_spec(op).test_shapes) for op in ("bias_gelu", "layer_norm"))
    assert len(doc["ops"]) == n_shapes
    assert all(r["backend"] == "reference" and r["dtype"] == "fp16" and r["ok"] for r in doc["ops"])
    assert all(r["err"] <= r["bound"] for r in doc["ops"])
    assert "ops vs their reference" in out and "gpt2fast vs transformers" not in out
    assert f"parity ok: {n_shapes} checks" in out


def test_parity_default_backends_are_the_available_ones():
    names = parity_cli.parity_backends(None, torch.device("cpu"))
    assert "reference" in names
    assert names == [name for name, ok, _ in info.backend_rows("cpu") if ok]


def _broken_bias_gelu(x, bias):
    return x + bias  # forgot the GELU


def _broken_decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    return torch.zeros_like(q)  # attends to nothing


@pytest.fixture
def broken_reference(request):
    """The ``reference`` backend's implementation of an op replaced by a broken one (the spec re-registered)."""
    op, broken = request.param
    original = ops.get_spec(op)
    ops.register_op(dataclasses.replace(original, reference=broken))
    yield op
    ops.register_op(original)


@pytest.mark.parametrize(
    ("broken_reference", "failing_paths"),
    [
        (("bias_gelu", _broken_bias_gelu), {"forward", "decode"}),
        (("decode_attention", _broken_decode_attention), {"decode"}),
    ],
    indirect=["broken_reference"],
)
def test_parity_fails_on_a_broken_op(tmp_path, capsys, broken_reference, failing_paths):
    path = tmp_path / "parity.json"
    argv = ["parity", *TINY, "--dtype", "fp32", "--backend", "reference", "--no-ops", "--seq-len", "8"]
    code, _, err = run(capsys, *argv, "--json", str(path))
    assert code == 1
    assert "parity FAILED" in err
    doc = json.loads(path.read_text())
    assert doc["ok"] is False
    assert {r["path"] for r in doc["results"] if not r["ok"]} == failing_paths


@pytest.fixture
def wrong_backend():
    """A backend registered at run time whose bias_gelu forgets the GELU and whose layer_norm crashes."""
    ops.register_backend("wrongback", priority=-5, is_available=lambda device: None)
    ops.register_impl("bias_gelu", "wrongback")(_broken_bias_gelu)

    def crash(x, weight, bias, eps, residual):
        raise RuntimeError("kernel exploded")

    ops.register_impl("layer_norm", "wrongback")(crash)
    yield "wrongback"
    ops.unregister_backend("wrongback")


def test_parity_of_the_ops_fails_on_a_wrong_backend(tmp_path, capsys, wrong_backend):
    path = tmp_path / "parity.json"
    argv = ["parity", "--backend", "reference", "--backend", wrong_backend, "--dtype", "fp32"]
    code, _, err = run(capsys, *argv, "--json", str(path))
    assert code == 1
    assert "parity FAILED for bias_gelu/wrongback/fp32/" in " ".join(err.split())
    assert "kernel exploded" in err
    doc = json.loads(path.read_text())
    assert doc["ok"] is False
    by = {(r["op"], r["backend"]): [] for r in doc["ops"]}
    for r in doc["ops"]:
        by[(r["op"], r["backend"])].append(r)
    assert all(r["ok"] for spec in ops.specs() for r in by[(spec.name, "reference")])
    # every shape but one fails; its single element is a large positive value, where gelu(x) = x to fp32 precision
    assert [r["shape"] for r in by[("bias_gelu", wrong_backend)] if r["ok"]] == ["rows=1,n=1"]
    assert all(r["error"] == "RuntimeError: kernel exploded" for r in by[("layer_norm", wrong_backend)])
    assert {op for op, be in by if be == wrong_backend} == {"bias_gelu", "layer_norm"}  # it implements only these


# ---- a toy op added at run time is picked up by parity and the benchmark -----------------------------------------
def _toy(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    return dispatch("toy", backend, (x,), x.device)


@pytest.fixture
def toy_op():
    """An op registered at run time from a spec with a reference implementation only."""
    spec = OpSpec(
        name="toy",
        op=_toy,
        args=("x",),
        reference=lambda x: 2 * x + 1,
        make_inputs=lambda shape, dtype, device, gen: dict(
            x=torch.randn(shape["rows"], shape["n"], generator=gen).to(device=device, dtype=dtype)
        ),
        test_shapes=(dict(rows=3, n=5), dict(rows=1, n=33)),
    )
    ops.register_op(spec)
    yield spec
    ops.unregister_op("toy")


def test_a_toy_op_is_in_the_parity_table(tmp_path, capsys, toy_op):
    path = tmp_path / "parity.json"
    code, out, err = run(capsys, "parity", "--backend", "reference", "--op", "toy", "--json", str(path))
    assert code == 0, out + err
    assert "toy" in out
    rows = json.loads(path.read_text())["ops"]
    assert {(r["op"], r["backend"], r["dtype"]) for r in rows} == {
        ("toy", "reference", d) for d in ("fp32", "fp16", "bf16")
    }
    assert {r["shape"] for r in rows} == {"rows=3,n=5", "rows=1,n=33"} and all(r["ok"] for r in rows)


def test_a_toy_op_is_benchmarked(tmp_path, capsys, toy_op):
    path = tmp_path / "k.json"
    code, out, err = run(capsys, "bench", "kernels", "--op", "toy", "--device", "cpu", "--json", str(path))
    assert code == 0, out + err
    recs = load_json(path)["records"]
    assert {r["op"] for r in recs} == {"toy"}
    assert {str(r["shape"]) for r in recs} == {str(s) for s in toy_op.test_shapes}  # no bench cases: its test shapes
    ran = [r for r in recs if r["error"] is None]
    assert {r["provider"] for r in ran} == {"gpt2fast:reference"} and all(r["check"]["ok"] for r in ran)
    assert {r["provider"] for r in recs} == {"gpt2fast:reference", "torch.compile"}  # compile: skipped on CPU


# ---- errors -----------------------------------------------------------------------------
BAD = [
    (["generate", "--random", "gpt3"], "invalid choice: 'gpt3'"),
    (["generate", "--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
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
    (["parity", "--no-ops"], "nothing to check: --no-ops without --model DIR or --random SIZE"),
    (["parity", "--op", "softmax"], "--op softmax: unknown op; choose one of"),
    (["parity", "--op", "layer_norm", "--no-ops"], "not allowed with argument"),
    (["parity", "--backend", "nope"], "--backend nope: unknown backend; choose one of"),
    (["parity", "--backend", "auto"], "--backend auto: unknown backend"),
    (["generate", *TINY, "--backend", "nope"], "--backend nope: unknown backend; choose one of auto,"),
    (["bench", "kernels", "--op", "softmax"], "--op: unknown ['softmax']"),
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
    monkeypatch.setitem(sys.modules, "gpt2fast.bench.kernels", None)  # makes the import fail
    code, _, err = run(capsys, "bench", "kernels")
    assert code == 2
    assert "bench is unavailable: cannot import gpt2fast.bench.kernels" in err


def test_bench_is_wired(capsys):
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
