"""Training GPT-2 on gpt2fast's own differentiable ops: the library behind ``gpt2fast train``.

One loop for one process and for ``torchrun`` (data-parallel on ``torch.distributed``):

* **data**: :mod:`gpt2fast.data` tokenizes the text once into ``uint16`` memmaps (rank 0, the others wait) and
  draws each optimizer step's global batch of windows from a seeded per-epoch permutation; rank ``r`` of ``W``
  reads the ``r``-th contiguous ``1/W`` of that batch, in ``micro_batch_size`` pieces (gradient accumulation);
* **model**: from scratch (GPT-2's initialisation, seeded) or from an HF-format checkpoint (``init``), parameters
  in fp32, optionally under bf16/fp16 autocast (fp16 with a gradient scaler);
* **loss**: ``model(ids, labels=ids).loss``, transformers' shifted-label semantics;
* **optimizer**: torch's AdamW (fused where the device supports it), weight decay on matrices only (not on biases,
  LayerNorm parameters), linear warm-up then cosine decay to ``min_lr``, gradient clipping by global norm;
* **parallelism**: ``DistributedDataParallel`` (NCCL on GPUs, gloo on CPU), ``no_sync`` on all but the last
  micro-batch of a step.  FSDP2 is not used: every GPT-2 size (at most 1.5 B parameters, 24 GB with fp32 AdamW
  state) fits replicated on one current GPU, where sharding would add an all-gather per layer and step for memory
  that is not needed;
* **evaluation** every ``eval_interval`` steps: the held-out loss (and its exp, the perplexity) on the same evenly
  spread windows each time, split across ranks;
* **checkpoints** (rank 0 writes, every rank reads; the output folder must be on a file system every rank sees):
  ``save_pretrained`` (HF format, transformers loads it) plus ``training_state.pt`` (optimizer, grad scaler, step,
  data position, every rank's RNG states, early-stopping state) and ``run.json`` (what must match to resume).
  ``resume`` continues exactly: on CPU, ``N`` steps straight and ``N/2`` + resume + ``N/2`` give bit-identical
  weights (``tests/test_train.py``);
* **records**: a progress bar (loss, tokens/s, ETA), ``train_log.jsonl`` (one line per step and per evaluation),
  ``loss_curve.png`` and ``train_summary.json``; the final model is saved in the output folder itself.

Everything that can be checked is checked before any work (:func:`check_config`, the output folder, the data,
``resume`` against the run it continues).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpt2fast import data as datalib
from gpt2fast.config import GPT2Config

#: Autocast dtypes by their command-line name ("fp32": autocast off).
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The fields of :class:`TrainConfig` that decide the trajectory: a resumed run must agree on every one.
RUN_FIELDS = (
    "block_size",
    "batch_size",
    "steps",
    "lr",
    "min_lr",
    "warmup",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "dtype",
    "seed",
)

#: The ops a training forward calls (decode attention is inference-only).
TRAINING_OPS = ("layer_norm", "attention", "bias_gelu", "linear_cross_entropy")

CHECKPOINTS, STATE_FILE, RUN_FILE = "checkpoints", "training_state.pt", "run.json"
LOG_FILE, CURVE_FILE, SUMMARY_FILE = "train_log.jsonl", "loss_curve.png", "train_summary.json"


class ResumeError(ValueError):
    """``resume`` names no checkpoint, or one of a run with another model, data or hyperparameters."""


@dataclass
class TrainConfig:
    """Everything a training run takes; the command line's options one to one (``None``: the documented default).

    The global batch (``batch_size`` windows of ``block_size`` tokens per optimizer step) is split over the ranks
    and, on each rank, into micro-batches of ``micro_batch_size`` (default: the rank's whole share); the number of
    micro-batches is the gradient accumulation.  ``steps`` is the length of the schedule; ``stop_at`` ends the run
    earlier (with a checkpoint to resume from).
    """

    data: str
    out: str
    val_data: str | None = None
    val_fraction: float = 0.1
    cache_dir: str | None = None  # default: OUT/tokens
    size: str | None = None  # a GPT2Config.from_name size, from scratch
    init: str | None = None  # an HF-format checkpoint to fine-tune
    n_layer: int | None = None  # overrides of the size's shape (from scratch only)
    n_head: int | None = None
    n_embd: int | None = None
    n_positions: int | None = None
    dropout: float | None = None  # embd/resid/attn_pdrop of the model (default: the config's, transformers' 0.1)
    block_size: int | None = None  # default: the model's n_positions
    batch_size: int = 8
    micro_batch_size: int | None = None
    steps: int = 1000
    stop_at: int | None = None
    lr: float = 6e-4
    min_lr: float | None = None  # default: lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    dtype: str = "fp32"  # autocast: fp32 (off), bf16, fp16 (with a gradient scaler)
    backend: str | None = None
    device: str | None = None
    seed: int = 0
    eval_interval: int = 100
    eval_tokens: int = 32768  # 0: the whole held-out split
    checkpoint_interval: int | None = None  # default: eval_interval
    keep_checkpoints: int = 2
    patience: int = 0  # stop after this many evaluations without a better held-out loss (0: never)
    resume: str | None = None  # "latest" (OUT's newest checkpoint) or a checkpoint folder
    threads: int | None = None  # torch.set_num_threads
    progress: bool = True


@dataclass
class TrainResult:
    """What a run ended with: the last step, the last evaluation, and where things were written."""

    step: int
    train_loss: float | None
    val_loss: float | None
    val_ppl: float | None
    best_val_loss: float | None
    tokens: int
    seconds: float
    out: Path
    stopped_early: bool


# ---- checks --------------------------------------------------------------------------------------------------
def check_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise ``ValueError``/``TypeError`` naming the first invalid hyperparameter of ``cfg`` (before any work)."""
    from gpt2fast.checks import check_int

    def positive(name: str, allow_zero: bool = False) -> None:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{_flag(name)} must be a finite number, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(f"{_flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    check_int("--batch-size", cfg.batch_size, 1)
    check_int("--steps", cfg.steps, 1)
    check_int("--warmup", cfg.warmup, 0)
    check_int("--eval-interval", cfg.eval_interval, 1)
    check_int("--eval-tokens", cfg.eval_tokens, 0)
    check_int("--keep-checkpoints", cfg.keep_checkpoints, 1)
    check_int("--patience", cfg.patience, 0)
    check_int("--seed", cfg.seed, 0)
    for name in ("n_layer", "n_head", "n_embd", "n_positions", "block_size", "micro_batch_size", "threads"):
        if getattr(cfg, name) is not None:
            check_int(_flag(name), getattr(cfg, name), 1 if name != "block_size" else 2)
    if cfg.checkpoint_interval is not None:
        check_int("--checkpoint-interval", cfg.checkpoint_interval, 1)
    if cfg.stop_at is not None:
        check_int("--stop-at", cfg.stop_at, 1, cfg.steps + 1)
    if cfg.dropout is not None and (not isinstance(cfg.dropout, (int, float)) or not 0 <= cfg.dropout < 1):
        raise ValueError(f"--dropout must lie in [0, 1), got {cfg.dropout!r}")
    if cfg.warmup > cfg.steps:
        raise ValueError(f"--warmup ({cfg.warmup}) must not exceed --steps ({cfg.steps})")
    positive("lr")
    positive("weight_decay", allow_zero=True)
    positive("grad_clip", allow_zero=True)
    if cfg.min_lr is not None:
        positive("min_lr", allow_zero=True)
        if cfg.min_lr > cfg.lr:
            raise ValueError(f"--min-lr ({cfg.min_lr}) must not exceed --lr ({cfg.lr})")
    for name in ("beta1", "beta2"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{_flag(name)} must lie in [0, 1), got {value!r}")
    if not isinstance(cfg.val_fraction, (int, float)) or not 0 < cfg.val_fraction < 1:
        raise ValueError(f"--val-fraction must lie in (0, 1), got {cfg.val_fraction!r}")
    if cfg.dtype not in AMP_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(AMP_DTYPES)}, got {cfg.dtype!r}")
    if cfg.size is not None and cfg.init is not None:
        raise ValueError("give --size (from scratch) or --init (fine-tune), not both")
    shape = [n for n in ("n_layer", "n_head", "n_embd", "n_positions") if getattr(cfg, n) is not None]
    if cfg.init is not None and shape:
        raise ValueError(f"{_flag(shape[0])} changes the model's shape; it cannot be combined with --init")
    if cfg.size is None and cfg.init is None and cfg.resume is None:
        raise ValueError("give --size NAME to train from scratch, --init DIR to fine-tune, or --resume")
    micro = cfg.micro_batch_size
    if cfg.batch_size % world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be a multiple of the {world_size} processes")
    if micro is not None and (cfg.batch_size // world_size) % micro:
        raise ValueError(
            f"--micro-batch-size {micro} must divide each process's share of the batch "
            f"({cfg.batch_size} / {world_size} = {cfg.batch_size // world_size})"
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_output_dir(out: str | Path) -> Path:
    """Create ``out`` if needed and prove it writable (a probe file), else ``PermissionError`` naming it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"--out {out} is not writable: {exc.strerror or exc}") from None
    return out


def check_training_backend(backend: str | None, config: GPT2Config) -> None:
    """Refuse a named ``backend`` that cannot run this model's shapes or has no backward for an op the training
    forward calls (``"auto"``/None pick differentiable implementations per call)."""
    from gpt2fast import checks, ops
    from gpt2fast.ops._registry import get_impl

    checks.check_model_backend(backend, config, torch.float32)
    if backend is None or backend == ops.AUTO:
        return
    for op in TRAINING_OPS:
        try:
            impl = get_impl(op, backend)
        except (ValueError, ops.BackendUnavailableError) as exc:
            raise ValueError(f"--backend {backend} cannot train: {exc}") from None
        if not impl.differentiable:
            raise ValueError(
                f"--backend {backend} has no backward for {op!r}, so it cannot train; use auto or a backend "
                "that registers one (gpt2fast info)"
            )


# ---- the schedule --------------------------------------------------------------------------------------------
def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up over ``warmup`` steps to ``lr``,
    then a cosine from ``lr`` down to ``min_lr`` at ``steps``."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


# ---- distributed ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place in the run: rank, world size, local rank, device."""

    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: prepares the data, writes checkpoints and records."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks (for logged scalars; gradients go through DDP)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def setup_distributed(device: str | None) -> Dist:
    """One process, or the ``torchrun`` group its environment describes (``WORLD_SIZE`` > 1): NCCL with one GPU
    per local rank on CUDA, gloo on CPU."""
    from gpt2fast.cli._common import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if world > 1:
        if dev.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} present)")
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, dev)


# ---- checkpoints ---------------------------------------------------------------------------------------------
def _run_record(cfg: TrainConfig, config: GPT2Config, fingerprint: str) -> dict:
    """What a resumed run must agree on: the model shape, the data, the trajectory's hyperparameters."""
    return {
        "model": dataclasses.asdict(config),
        "data": fingerprint,
        "hyperparameters": {name: getattr(cfg, name) for name in RUN_FIELDS},
    }


def find_checkpoint(resume: str, out: Path) -> Path:
    """The checkpoint folder ``resume`` names: ``"latest"`` is the newest one under ``OUT/checkpoints``."""
    if resume == "latest":
        found = sorted((out / CHECKPOINTS).glob("step_*[0-9]")) if (out / CHECKPOINTS).is_dir() else []
        if not found:
            raise ResumeError(f"--resume: no checkpoint under {out / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file() or not (path / RUN_FILE).is_file():
        raise ResumeError(f"--resume {path}: not a checkpoint folder (no {STATE_FILE} and {RUN_FILE})")
    return path


def check_resume(ckpt: Path, run: dict) -> None:
    """Raise :class:`ResumeError` listing every difference between the checkpoint's run and this one."""
    saved = json.loads((ckpt / RUN_FILE).read_text())
    diffs = []
    for section in ("model", "hyperparameters"):
        for key in sorted(set(saved[section]) | set(run[section])):
            a, b = saved[section].get(key), run[section].get(key)
            if a != b:
                diffs.append(f"{key} {a!r} -> {b!r}")
    if saved["data"] != run["data"]:
        diffs.append("the training data (another text, split or tokenizer)")
    if diffs:
        raise ResumeError(f"--resume {ckpt}: the checkpoint is of a different run: {'; '.join(diffs)}")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model: torch.nn.Module, state: dict, run: dict) -> None:
    """Write ``folder`` atomically: ``save_pretrained`` files, ``training_state.pt``, ``run.json``."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save(state, tmp / STATE_FILE)
    (tmp / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


def _prune_checkpoints(out: Path, keep: int) -> None:
    for old in sorted((out / CHECKPOINTS).glob("step_*[0-9]"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


# ---- records -------------------------------------------------------------------------------------------------
class Log:
    """``train_log.jsonl``: one JSON object per line (``{"step", "loss", ...}`` per step, ``{"step", "val_loss",
    "val_ppl"}`` per evaluation).  Resuming at step ``s`` drops the lines of later steps."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.records: list[dict] = []
        if resume_step is not None and path.is_file():
            self.records = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        elif path.exists():
            path.unlink()

    def write(self, record: dict) -> None:
        """Append ``record`` to the file and to :attr:`records`."""
        self.records.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def plot_loss_curve(records: list[dict], path: Path, title: str) -> Path | None:
    """Training loss per step (and its moving average) with the held-out loss per evaluation, as a PNG; None
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if losses:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="training loss")
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color="tab:blue", label=f"training loss ({k}-step mean)")
    evals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the run -------------------------------------------------------------------------------------------------
def _model_config(cfg: TrainConfig, ckpt: Path | None) -> GPT2Config:
    """The model's shape and dropout: the --init checkpoint's, the --size (with overrides), or the resumed
    checkpoint's; ``--dropout`` sets all three dropout probabilities."""
    if cfg.init is not None:
        if not Path(cfg.init).is_dir():
            raise FileNotFoundError(f"--init {cfg.init}: no such checkpoint folder")
        config = GPT2Config.from_json(cfg.init)
    elif cfg.size is None:
        config = GPT2Config.from_json(ckpt)
    else:
        config = GPT2Config.from_name(cfg.size)
        shape = {n: getattr(cfg, n) for n in ("n_layer", "n_head", "n_embd", "n_positions") if getattr(cfg, n)}
        config = dataclasses.replace(config, **shape)
    if cfg.dropout is not None:
        config = dataclasses.replace(config, embd_pdrop=cfg.dropout, resid_pdrop=cfg.dropout, attn_pdrop=cfg.dropout)
    return config


def _build_model(cfg: TrainConfig, config: GPT2Config, ckpt: Path | None, device: torch.device):
    """fp32, trainable, in train() mode: the checkpoint's weights (resume, then --init) or GPT-2's initialisation,
    in a model built from ``config`` (so --dropout applies to loaded weights too)."""
    from gpt2fast.model import GPT2

    source = ckpt if ckpt is not None else cfg.init
    if source is None:
        model = GPT2.random(config, seed=cfg.seed, dtype=torch.float32, device=device)
    else:
        loaded = GPT2.from_pretrained(source, dtype=torch.float32, device=device, quiet=True)
        with torch.device("meta"):
            model = GPT2(config)
        model.load_state_dict(loaded.state_dict(), assign=True)
    model.backend = cfg.backend
    return model.requires_grad_(True).train()


def _optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, linear weights) only; fused where the device has it."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or torch
        return torch.optim.AdamW(groups, **kwargs)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    tokens: np.ndarray,
    starts: np.ndarray,
    block_size: int,
    micro_batch_size: int,
    dist: Dist,
    amp: torch.dtype | None,
) -> float:
    """Mean held-out loss over the windows at ``starts`` (rank ``r`` takes every ``W``-th); every window holds
    ``block_size - 1`` targets, so the mean of window losses is the mean over tokens."""
    was_training = model.training
    model.eval()
    mine = starts[dist.rank :: dist.world]
    total = 0.0
    for i in range(0, len(mine), micro_batch_size):
        ids = datalib.gather_windows(tokens, mine[i : i + micro_batch_size], block_size).to(dist.device)
        with _autocast(dist.device, amp):
            total += float(model(ids, labels=ids).loss) * len(ids)
    model.train(was_training)
    loss_sum, count = dist.sum([total, float(len(mine))])
    return loss_sum / count


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Run (or resume) the training ``cfg`` describes; see the module docstring.  ``on_step(record)`` is called with
    each step's log record (tests use it).  Bad input raises before any work: ``ValueError``/``TypeError`` for
    hyperparameters, ``PermissionError`` for an unwritable output folder, :class:`~gpt2fast.data.DataError` for
    unusable text, :class:`ResumeError` for a checkpoint of another run."""
    dist = setup_distributed(cfg.device)
    check_config(cfg, dist.world)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    out = check_output_dir(cfg.out)
    ckpt = find_checkpoint(cfg.resume, out) if cfg.resume is not None else None
    config = _model_config(cfg, ckpt)
    cfg = dataclasses.replace(cfg, block_size=cfg.block_size or config.n_positions)
    if cfg.block_size > config.n_positions:
        raise ValueError(f"--block-size {cfg.block_size} exceeds the model's n_positions={config.n_positions}")
    check_training_backend(cfg.backend, config)
    amp = AMP_DTYPES[cfg.dtype]
    if amp is torch.bfloat16 and dist.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--dtype bf16: this GPU has no bf16 support; use fp16")
    micro = cfg.micro_batch_size or cfg.batch_size // dist.world
    accum = cfg.batch_size // dist.world // micro
    stop_at = cfg.stop_at or cfg.steps
    # Data: rank 0 tokenizes (once; the cache is reused), the others open what it wrote.
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else out / "tokens"
    if dist.main:
        tokens = datalib.prepare(cfg.data, cache_dir, cfg.block_size, cfg.val_data, cfg.val_fraction, cfg.seed)
    dist.barrier()
    if not dist.main:
        tokens = datalib.prepare(cfg.data, cache_dir, cfg.block_size, cfg.val_data, cfg.val_fraction, cfg.seed)
    run = _run_record(cfg, config, tokens.fingerprint)
    if ckpt is not None:
        check_resume(ckpt, run)
    # Model, optimizer, state.
    model = _build_model(cfg, config, ckpt, dist.device)
    optimizer = _optimizer(model, cfg, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp is torch.float16)
    sampler = datalib.WindowSampler(len(tokens.train), cfg.block_size, cfg.seed)
    start, best, bad_evals = 0, None, 0
    if ckpt is not None:
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        sampler.load_state_dict(state["sampler"])
        _set_rng_state(state["rng"][dist.rank % len(state["rng"])])
        start, best, bad_evals = state["step"], state["best_val_loss"], state["bad_evals"]
    else:
        torch.manual_seed(cfg.seed + 1_000_003 * dist.rank)  # dropout: a stream per rank, the same every run
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
    train_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        train_model = DistributedDataParallel(model, device_ids=device_ids)
    eval_windows = datalib.eval_starts(len(tokens.val), cfg.block_size, cfg.eval_tokens or None)
    log = Log(out / LOG_FILE, start if ckpt is not None else None) if dist.main else None
    ckpt_every = cfg.checkpoint_interval or cfg.eval_interval
    tokens_per_step = cfg.batch_size * cfg.block_size
    last_loss = last_val = None
    stopped_early = False
    t0 = time.perf_counter()

    def do_eval(step: int) -> None:
        nonlocal last_val, best, bad_evals
        last_val = evaluate(model, tokens.val, eval_windows, cfg.block_size, micro, dist, amp)
        if best is None or last_val < best:
            best, bad_evals = last_val, 0
        else:
            bad_evals += 1
        if log is not None:
            log.write({"step": step, "val_loss": last_val, "val_ppl": math.exp(min(last_val, 700.0))})

    def do_checkpoint(step: int) -> None:
        rngs = dist.gather(_rng_state())
        if dist.main:
            state = {
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": rngs,
                "best_val_loss": best,
                "bad_evals": bad_evals,
                "world_size": dist.world,
            }
            save_checkpoint(out / CHECKPOINTS / f"step_{step:06d}", model, state, run)
            _prune_checkpoints(out, cfg.keep_checkpoints)
        dist.barrier()

    if ckpt is None:
        do_eval(0)
    bar = _progress(stop_at, start, cfg.progress and dist.main)
    step = start
    try:
        for step in range(start + 1, stop_at + 1):
            t_step = time.perf_counter()
            lr = lr_at(step - 1, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = sampler.next_batch(cfg.batch_size)
            mine = batch[dist.rank * micro * accum : (dist.rank + 1) * micro * accum]
            loss_sum = 0.0
            for a in range(accum):
                ids = datalib.gather_windows(tokens.train, mine[a * micro : (a + 1) * micro], cfg.block_size)
                ids = ids.to(dist.device, non_blocking=True)
                sync = contextlib.nullcontext()
                if dist.world > 1 and a < accum - 1:
                    sync = train_model.no_sync()
                with sync:
                    with _autocast(dist.device, amp):
                        loss = train_model(ids, labels=ids).loss / accum
                    scaler.scale(loss).backward()
                loss_sum += float(loss.detach())
            scaler.unscale_(optimizer)
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            (last_loss,) = dist.sum([loss_sum])
            last_loss /= dist.world
            elapsed = time.perf_counter() - t_step
            record = {
                "step": step,
                "loss": last_loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step * tokens_per_step,
                "tokens_per_s": tokens_per_step / elapsed,
                "epoch": sampler.epoch + sampler.cursor / sampler.windows_per_epoch,
            }
            if log is not None:
                log.write(record)
            if on_step is not None:
                on_step(record)
            final = step == stop_at
            if step % cfg.eval_interval == 0 or final:
                do_eval(step)
                if cfg.patience and bad_evals >= cfg.patience:
                    stopped_early = final = True
            if step % ckpt_every == 0 or final:
                do_checkpoint(step)
            bar.set_postfix(
                loss=f"{last_loss:.3f}",
                val=f"{last_val:.3f}" if last_val is not None else "-",
                tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )
            bar.update(1)
            if stopped_early:
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    if dist.main:
        model.save_pretrained(out)
        plot_loss_curve(log.records, out / CURVE_FILE, f"{out.name}: {_describe(config)}, {cfg.dtype}")
        summary = {
            "step": step,
            "steps": cfg.steps,
            "stopped_early": stopped_early,
            "train_loss": last_loss,
            "val_loss": last_val,
            "val_ppl": math.exp(last_val) if last_val is not None else None,
            "best_val_loss": best,
            "tokens_seen": step * tokens_per_step,
            "train_tokens": len(tokens.train),
            "val_tokens": len(tokens.val),
            "eval_tokens": int(len(eval_windows) * cfg.block_size),
            "seconds_this_process": seconds,
            "world_size": dist.world,
            "device": str(dist.device),
            "run": run,
            "config": dataclasses.asdict(cfg),
        }
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier()
    val_ppl = math.exp(last_val) if last_val is not None else None
    return TrainResult(step, last_loss, last_val, val_ppl, best, step * tokens_per_step, seconds, out, stopped_early)


def _describe(config: GPT2Config) -> str:
    return f"{config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, {config.n_positions} positions"


def iter_log(path: str | Path) -> Iterator[dict]:
    """The records of a ``train_log.jsonl``."""
    with Path(path).open() as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
