"""gpt2fast.train and ``gpt2fast train``: the loop lowers the held-out loss, resumes bit-exactly, writes
transformers-loadable checkpoints and its records, runs data-parallel under torchrun (2 gloo ranks on 127.0.0.1),
and refuses bad input before any work.

Everything runs a model of one layer of width 32 with 32 positions (GPT-2's vocabulary, so the tokenizer's ids fit)
on a generated text, for a few dozen steps: seconds on a CPU core.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gpt2fast import cli
from gpt2fast.data import DataError
from gpt2fast.model import GPT2
from gpt2fast.train import (
    CHECKPOINTS,
    CURVE_FILE,
    LOG_FILE,
    SUMMARY_FILE,
    ResumeError,
    TrainConfig,
    check_config,
    lr_at,
    train,
)

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    *("thou", "art", "more", "lovely", "and", "temperate", "rough", "winds", "do"),
    *("shake", "the", "darling", "buds", "of", "may", "summer", "lease", "hath"),
]

#: The straight run of the exact-resume test: STEPS steps, against STEPS // 2 + resume + STEPS // 2.
STEPS = 24


def corpus(path: Path, n_words: int = 6000, seed: int = 0) -> Path:
    """A deterministic text of lines of words from a small vocabulary: learnable in a few dozen steps."""
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "." for _ in range(n_words // 6)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(data), out=str(out), size="tiny", n_layer=1, n_head=2, n_embd=32, n_positions=32, batch_size=4,
        steps=STEPS, warmup=4, lr=3e-3, eval_interval=STEPS // 2, eval_tokens=256, progress=False,
        cache_dir=str(out.parent / "tokens"),
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def curve(folder: Path) -> tuple[list[float], list[float]]:
    records = [json.loads(line) for line in (folder / LOG_FILE).read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r], [r["val_loss"] for r in records if "val_loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One straight run of STEPS steps, and the same run stopped at STEPS // 2 then resumed."""
    root = tmp_path_factory.mktemp("train")
    text = corpus(root / "text.txt")
    straight = train(tiny(text, root / "straight"))
    half = train(tiny(text, root / "split", stop_at=STEPS // 2))
    resumed = train(tiny(text, root / "split", resume="latest"))
    return root, text, straight, half, resumed


def test_training_lowers_the_held_out_loss(runs):
    root, _, straight, _, _ = runs
    train_losses, val_losses = curve(root / "straight")
    assert len(train_losses) == STEPS and len(val_losses) == 3  # steps 0, STEPS/2, STEPS
    assert val_losses[-1] < val_losses[0] - 1.0, val_losses
    assert straight.val_loss == val_losses[-1]
    summary = json.loads((root / "straight" / SUMMARY_FILE).read_text())
    assert summary["step"] == STEPS and summary["val_ppl"] == pytest.approx(torch.tensor(val_losses[-1]).exp().item())
    png = (root / "straight" / CURVE_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_is_bit_exact(runs):
    """STEPS steps straight == STEPS/2 steps, a new process-level run resuming, STEPS/2 more: same bits."""
    root, _, straight, half, resumed = runs
    assert half.step == STEPS // 2 and resumed.step == STEPS
    a, b = weights(root / "straight"), weights(root / "split")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert curve(root / "straight") == curve(root / "split")  # the log was continued, not restarted
    assert resumed.val_loss == straight.val_loss


def test_checkpoints_load_in_transformers_with_identical_logits(runs):
    transformers = pytest.importorskip("transformers")
    root = runs[0]
    ckpt = root / "straight" / CHECKPOINTS / f"step_{STEPS:06d}"
    files = ["config.json", "model.safetensors", "run.json", "training_state.pt"]
    assert sorted(p.name for p in ckpt.iterdir()) == files
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ours = GPT2.from_pretrained(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(weights(ckpt)["transformer.wte.weight"], weights(root / "straight")["transformer.wte.weight"])


def test_checkpoints_are_pruned_and_state_is_complete(runs):
    root = runs[0]
    kept = sorted(p.name for p in (root / "straight" / CHECKPOINTS).iterdir())
    assert kept == [f"step_{STEPS // 2:06d}", f"step_{STEPS:06d}"]  # checkpoint every eval_interval, keep 2
    state = torch.load(root / "straight" / CHECKPOINTS / kept[-1] / "training_state.pt", weights_only=False)
    assert {"step", "optimizer", "scaler", "sampler", "rng", "best_val_loss", "bad_evals"} <= state.keys()
    assert state["step"] == STEPS and len(state["rng"]) == 1


def test_resume_refuses_a_different_run(runs):
    root, text, *_ = runs
    with pytest.raises(ResumeError, match=r"n_embd 32 -> 64"):
        train(tiny(text, root / "split", resume="latest", n_embd=64))
    with pytest.raises(ResumeError, match=r"lr 0.003 -> 0.001"):
        train(tiny(text, root / "split", resume="latest", lr=1e-3))
    other = corpus(root / "other.txt", seed=1)
    with pytest.raises(ResumeError, match="the training data"):
        train(tiny(other, root / "split", resume="latest"))
    with pytest.raises(ResumeError, match="no checkpoint under"):
        train(tiny(text, root / "nothing-here", resume="latest"))


def test_fine_tuning_from_a_checkpoint(runs, tmp_path):
    root, text, straight, *_ = runs
    cfg = tiny(text, tmp_path / "ft", size=None, init=str(root / "straight"), n_layer=None, n_head=None, n_embd=None,
               n_positions=None, steps=4, warmup=1, eval_interval=4, lr=1e-3, dropout=0.0)  # fmt: skip
    result = train(cfg)
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert (saved["n_embd"], saved["embd_pdrop"], saved["attn_pdrop"]) == (32, 0.0, 0.0)
    _, val = curve(tmp_path / "ft")
    assert val[0] == pytest.approx(straight.val_loss, rel=1e-6)  # starts where the checkpoint ended
    assert result.val_loss < val[0]


def test_lr_schedule():
    cfg = TrainConfig(data="x", out="y", size="tiny", steps=100, warmup=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, dtype):
    """Autocast with fp32 parameters (fp16 through the gradient scaler): the held-out loss falls."""
    text = corpus(tmp_path / "text.txt", n_words=1500)
    result = train(tiny(text, tmp_path / "run", dtype=dtype, steps=3, warmup=1, eval_interval=3))
    _, val = curve(tmp_path / "run")
    assert val[-1] == result.val_loss < val[0]
    state = torch.load(tmp_path / "run" / CHECKPOINTS / "step_000003" / "training_state.pt", weights_only=False)
    assert bool(state["scaler"]) == (dtype == "fp16")  # the scaler's state exists only when it is enabled


# ---- data parallel -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    """torchrun, 2 CPU ranks on 127.0.0.1, global batch 4 (2 per rank) vs one process reading the same 4 windows as
    2 micro-batches of 2: same loss curve and final weights within fp32 rounding (on this machine they agree to
    the bit).  The DDP run's step-2 checkpoint (written by rank 0) is then resumed in one process: same end."""
    text = corpus(tmp_path / "text.txt", n_words=3000)
    steps = dict(steps=4, warmup=1, eval_interval=2, batch_size=4, dropout=0.0)  # dropout masks differ per rank
    single = train(tiny(text, tmp_path / "single", micro_batch_size=2, **steps))
    argv = [
        "--data", str(text), "--out", str(tmp_path / "ddp"), "--cache-dir", str(tmp_path / "tokens"), "--size", "tiny",
        "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--n-positions", "32", "--batch-size", "4",
        "--steps", "4", "--warmup", "1", "--lr", "3e-3", "--eval-interval", "2", "--eval-tokens", "256",
        "--no-progress", "--threads", "1", "--dropout", "0",
    ]  # fmt: skip
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--nnodes", "1",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "gpt2fast", "train", *argv]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = tmp_path / "ddp"
    assert json.loads((ddp / SUMMARY_FILE).read_text())["world_size"] == 2
    (ours_train, ours_val), (ref_train, ref_val) = curve(ddp), curve(tmp_path / "single")
    assert ours_train == pytest.approx(ref_train, rel=1e-6) and ours_val == pytest.approx(ref_val, rel=1e-6)
    a, b = weights(ddp), weights(tmp_path / "single")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)
    state = torch.load(ddp / CHECKPOINTS / "step_000002" / "training_state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG, gathered on rank 0
    resumed = train(
        tiny(text, tmp_path / "resumed", micro_batch_size=2, resume=str(ddp / CHECKPOINTS / "step_000002"), **steps)
    )
    assert resumed.val_loss == pytest.approx(single.val_loss, rel=1e-6)
    for name, t in weights(tmp_path / "resumed").items():
        torch.testing.assert_close(t, b[name], rtol=1e-6, atol=1e-6, msg=name)


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(lr=-1.0), ValueError, "--lr must be > 0"),
        (dict(lr=float("nan")), TypeError, "--lr must be a finite number"),
        (dict(steps=0), ValueError, r"--steps must be >= 1"),
        (dict(warmup=30), ValueError, r"--warmup \(30\) must not exceed --steps \(24\)"),
        (dict(batch_size=4, micro_batch_size=3), ValueError, "--micro-batch-size 3 must divide"),
        (dict(beta2=1.0), ValueError, r"--beta2 must lie in \[0, 1\)"),
        (dict(grad_clip=-1.0), ValueError, "--grad-clip must be >= 0"),
        (dict(dtype="fp8"), ValueError, "--dtype must be one of fp32, bf16, fp16"),
        (dict(stop_at=25), ValueError, r"--stop-at must be in \[1, 25\)"),
        (dict(min_lr=1.0), ValueError, r"--min-lr \(1.0\) must not exceed --lr"),
        (dict(dropout=1.0), ValueError, r"--dropout must lie in \[0, 1\)"),
        (dict(val_fraction=1.0), ValueError, r"--val-fraction must lie in \(0, 1\)"),
        (dict(size=None), ValueError, "give --size NAME"),
        (dict(init="somewhere"), ValueError, "not both"),
        (dict(size=None, init="somewhere"), ValueError, "--n-layer changes the model's shape"),
        (dict(block_size=64), ValueError, "--block-size 64 exceeds the model's n_positions=32"),
        (dict(backend="no-such-backend"), ValueError, "unknown backend 'no-such-backend'"),
        (dict(backend="cuda"), ValueError, "backend '?cuda'? (cannot run this model|has no backward|cannot train)"),
    ],
)
def test_bad_hyperparameters_fail_before_any_work(tmp_path, change, error, match):
    text = corpus(tmp_path / "text.txt", n_words=600)
    with pytest.raises(error, match=match):
        train(tiny(text, tmp_path / "out", **change))
    assert not (tmp_path / "tokens").exists()  # nothing was tokenized


def test_check_config_counts_the_processes():
    cfg = TrainConfig(data="x", out="y", size="tiny", batch_size=6)
    check_config(cfg, world_size=2)
    with pytest.raises(ValueError, match="multiple of the 4 processes"):
        check_config(cfg, world_size=4)


def test_bad_data_and_output_fail_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.txt files"):
        train(tiny(tmp_path / "empty", tmp_path / "out"))
    short = tmp_path / "short.txt"
    short.write_text("Shall I compare thee?")
    with pytest.raises(DataError, match="shorter than one block of 32 tokens"):
        train(tiny(short, tmp_path / "out"))
    assert not (tmp_path / "out" / LOG_FILE).exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="is not writable"):
        train(tiny(corpus(tmp_path / "text.txt", n_words=600), blocker / "out"))


def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = cli.main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--size", "tiny"])
    err = capsys.readouterr().err
    assert code == 2 and "holds no .txt files" in err and len(err.strip().splitlines()) == 1
    text = corpus(tmp_path / "t.txt", n_words=600)
    code = cli.main(["train", "--data", str(text), "--out", str(tmp_path / "o"), "--size", "tiny", "--lr", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--lr must be > 0" in err


def test_cli_trains(tmp_path, capsys):
    text = corpus(tmp_path / "t.txt", n_words=1200)
    argv = ["train", "--data", str(text), "--out", str(tmp_path / "o"), "--size", "tiny", "--n-layer", "1",
            "--n-embd", "32", "--n-head", "2", "--n-positions", "32", "--steps", "3", "--warmup", "1",
            "--eval-interval", "3", "--eval-tokens", "64", "--batch-size", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "step 3: held-out loss" in err and "3/3" in err  # the final line and the progress bar
    cfg = json.loads((tmp_path / "o" / SUMMARY_FILE).read_text())["config"]
    assert dataclasses.asdict(TrainConfig(**cfg))["steps"] == 3
