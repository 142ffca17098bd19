"""``gpt2fast bench train`` on CPU: the dry run CI runs, its document, the ratios and targets, bad arguments.

Speed is never asserted; these check that every provider runs (or records why not), that all providers start
from the same weights (the same first loss), and that the figures are derived from the measured ones.
"""

from __future__ import annotations

import pytest
from _backends import auto_backend

from gpt2fast import cli, ops
from gpt2fast.bench import report, train
from gpt2fast.bench.results import load_json

pytest.importorskip("transformers")

HAS_LOSS = hasattr(ops, "linear_cross_entropy")


def bench(*argv: str) -> int:
    """``gpt2fast bench ARGV...`` in-process; returns its exit status."""
    return cli.main(["bench", *argv])


def test_cpu_dry_run_records_every_provider_from_the_same_weights(tmp_path):
    path, md = tmp_path / "t.json", tmp_path / "t.md"
    code = bench("train", "--device", "cpu", "--shape", "2x4", "--steps", "1", "--warmup", "0", "--json", str(path),
                 "--markdown", str(md))  # fmt: skip
    assert code == 0
    doc = load_json(path)
    steps = [r for r in doc["records"] if r["case"] == "step"]
    assert [r["provider"] for r in steps] == list(train.STEP_PROVIDERS)
    assert {(r["size"], r["shape"]["batch"], r["shape"]["seq"], r["autocast"]) for r in steps} == {("tiny", 2, 4, None)}
    by = {r["provider"]: r for r in steps}
    for name in (train.EAGER, train.SDPA, train.PATCHED):
        rec = by[name]
        assert rec["error"] is None, rec
        assert rec["tokens_per_s"] == pytest.approx(8 * 1e3 / rec["step_ms"])
        assert rec["loss"] == pytest.approx(by[train.EAGER]["loss"], rel=1e-5)  # one initialisation for all
        assert rec["peak_mem_bytes"] is None  # CPU: no allocator statistics
    patched = by[train.PATCHED]
    assert patched["ops_dispatched"] or "patch_hf ran no gpt2fast op" in patched["note"]
    for name in (train.NATIVE, train.COMPILED):
        rec = by[name]
        if not HAS_LOSS:  # the fused loss has not landed: the provider's error is the data
            assert "linear_cross_entropy" in rec["error"]
            continue
        assert rec["error"] is None, rec
        assert rec["loss"] == pytest.approx(by[train.EAGER]["loss"], rel=1e-4)
        assert rec["ratios"]["tokens_per_s_vs_" + train.SDPA] == pytest.approx(
            rec["tokens_per_s"] / by[train.SDPA]["tokens_per_s"]
        )
    if HAS_LOSS:
        dispatched = by[train.NATIVE]["ops_dispatched"]
        lce, attention = (auto_backend(op, grad=True) for op in ("linear_cross_entropy", "attention"))
        assert dispatched[f"linear_cross_entropy@{lce}"] == 1 and dispatched[f"attention@{attention}"] == 2
    cases = {(r["case"], r["provider"]) for r in doc["records"] if r["case"] != "step"}
    assert cases == {("loss", "torch"), ("loss", train.NATIVE), ("attention_backward", "torch.sdpa"),
                     ("attention_backward", train.NATIVE)}  # fmt: skip
    text = md.read_text()
    assert text == report.markdown(doc)
    assert "| step | tiny | batch=2 seq=4 | transformers+sdpa |" in text


def _rec(provider: str, ms: float, mem: int | None, tokens: float | None = None) -> dict:
    rec = train._record("step", provider, train.Options(), size="gpt2", batch=1, seq=1)
    return rec | dict(step_ms=ms, peak_mem_bytes=mem, tokens_per_s=tokens)


def test_ratios_and_targets_come_from_the_group():
    group = {
        train.EAGER: _rec(train.EAGER, 100.0, 1000, 10.0),
        train.SDPA: _rec(train.SDPA, 80.0, 900, 12.5),
        "broken": _rec("broken", 1.0, 1, 1.0) | {"error": "RuntimeError: x"},
    }
    own = _rec(train.NATIVE, 50.0, 500, 20.0)
    group[train.NATIVE] = own
    train._ratios(own, group)
    assert own["ratios"] == {
        "time_vs_transformers": 0.5,
        "tokens_per_s_vs_transformers": 2.0,
        "peak_mem_vs_transformers": 0.5,
        "time_vs_transformers+sdpa": 0.625,
        "tokens_per_s_vs_transformers+sdpa": 1.6,
        "peak_mem_vs_transformers+sdpa": pytest.approx(500 / 900),
    }
    assert own["targets"] == {
        "tokens_per_s_vs_transformers+sdpa": {"target": ">= 1.3", "met": True},
        "peak_mem_vs_transformers": {"target": "<= 0.6", "met": True},
    }
    slow = _rec(train.NATIVE, 90.0, 700, 11.0)
    train._ratios(slow, group)
    assert {k: v["met"] for k, v in slow["targets"].items()} == {
        "tokens_per_s_vs_transformers+sdpa": False,
        "peak_mem_vs_transformers": False,
    }


def test_bad_arguments_exit_2(capsys):
    assert bench("train", "--device", "cpu", "--shape", "8by1024") == 2
    assert "--shape values must be BxT" in capsys.readouterr().err
    assert bench("train", "--device", "cpu", "--shape", "2x129") == 2
    assert "--shape seq 129 exceeds tiny's n_positions=128" in capsys.readouterr().err
    assert bench("train", "--device", "cpu", "--provider", "deepspeed") == 2
    assert "--provider: unknown ['deepspeed']" in capsys.readouterr().err
    assert bench("train", "--device", "cpu", "--dropout", "1.0") == 2
    assert "--dropout must lie in [0, 1)" in capsys.readouterr().err
    assert bench("train", "--device", "cpu", "--size", "gpt5") == 2
    assert "unknown GPT-2 size 'gpt5'" in capsys.readouterr().err
