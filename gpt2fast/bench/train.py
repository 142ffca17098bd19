"""Training benchmark: one forward + backward + AdamW step per provider, and the loss head and attention alone.

``step`` records time a full training step of a GPT-2 (``model(ids, labels=ids).loss``, ``backward()``,
``AdamW.step()``, ``zero_grad``) for each provider on the *same* initial weights: transformers' own random
initialisation, copied into gpt2fast with ``GPT2.from_hf``.  Every provider therefore starts from the same
loss, and the record keeps the first step's loss as a sanity column.  Parameters and AdamW states are fp32;
the forward runs under autocast (bf16 by default on a GPU; off on CPU), the backward outside it.  Dropout is
the same for every provider (``Options.dropout``, default 0: the attention then runs the registry's kernels
in gpt2fast; with ``attn_pdrop > 0`` gpt2fast's attention falls back to SDPA with dropout).

Providers: ``transformers`` (eager attention), ``transformers+sdpa``, ``transformers+patch_hf`` (an eager model
patched by :func:`gpt2fast.patch_hf`), ``gpt2fast:auto`` (the native model, every op on the best backend that
can train it) and ``gpt2fast:auto+compile`` (the same under ``torch.compile``).  A provider that fails is
recorded with its error; each record also lists the gpt2fast ops one step dispatched and on which backend
(``ops_dispatched``), so a provider that silently runs transformers' code is visible.

``loss`` records time the loss head alone, forward + backward: ``ops.linear_cross_entropy(hidden [N, C],
weight [V, C], labels)`` against ``F.cross_entropy`` over the full ``hidden @ weight.T`` logits, as V and N
sweep; ``attention_backward`` records time the backward of causal attention alone (the forward's graph kept),
``ops.attention`` against torch SDPA.  Their ``peak_mem_bytes`` is what the call allocates beyond its inputs
and saved tensors (CUDA only; None on CPU).

Timing: wall time of whole steps (each ends in a device sync), median and 20th/80th percentiles after warm-up
steps (the compiled provider's first step, its compilation, is reported apart as ``first_step_s``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import product

import torch
import torch.nn.functional as F

from gpt2fast import GPT2, GPT2Config, ops
from gpt2fast.bench.timing import sync, time_cpu

EAGER, SDPA, PATCHED = "transformers", "transformers+sdpa", "transformers+patch_hf"
NATIVE, COMPILED = "gpt2fast:auto", "gpt2fast:auto+compile"
STEP_PROVIDERS = (EAGER, SDPA, PATCHED, NATIVE, COMPILED)
#: The GPU targets of issue 11 (unverified until a GPU run): ratio name -> (">=" or "<=", bound).  Step records
#: have the first two, attention-backward records the third.
TARGETS = {
    "tokens_per_s_vs_" + SDPA: (">=", 1.3),
    "peak_mem_vs_" + EAGER: ("<=", 0.6),
    "time_vs_torch.sdpa": ("<=", 1.0),
}


@dataclass
class Options:
    """What to run.  ``shapes`` are (batch, seq) pairs; ``autocast`` is a dtype or None (no autocast)."""

    sizes: tuple[str, ...] = ("gpt2", "gpt2-medium")  # GPT2Config.from_name names ("tiny" for CPU runs)
    shapes: tuple[tuple[int, int], ...] = ((8, 1024), (32, 512))
    autocast: torch.dtype | None = torch.bfloat16
    dropout: float = 0.0  # embd_pdrop = resid_pdrop = attn_pdrop for every provider
    steps: int = 10  # timed steps
    warmup: int = 3
    lr: float = 1e-4
    compile_backend: str | None = None  # None: "inductor" on CUDA, "aot_eager" elsewhere
    providers: tuple[str, ...] | None = None  # a subset of STEP_PROVIDERS (None: all)
    components: bool = True  # the loss-head and attention sweeps
    loss_cases: tuple[tuple[int, int], ...] = ((2048, 50257), (8192, 8192), (8192, 32768), (8192, 50257),
                                               (16384, 50257))  # fmt: skip  # (N, V) at the size's width
    attention_cases: tuple[tuple[int, int, int], ...] = ((8, 1024, 64), (32, 512, 64))  # (B, T, D), H = n_head
    component_dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    log: Callable[[str], None] = field(default=print)

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad option."""
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must lie in [0, 1), got {self.dropout}")
        if not self.shapes or min(min(s) for s in self.shapes) < 1:
            raise ValueError(f"--shape values must be BxT with B, T >= 1, got {list(self.shapes)}")
        bad = [p for p in self.providers or () if p not in STEP_PROVIDERS]
        if bad:
            raise ValueError(f"--provider: unknown {bad}; choose from {STEP_PROVIDERS}")
        for size in self.sizes:
            cfg = GPT2Config.from_name(size)
            too_long = [t for _, t in self.shapes if t > cfg.n_positions]
            if too_long:
                raise ValueError(f"--shape seq {too_long[0]} exceeds {size}'s n_positions={cfg.n_positions}")


# ---- models ----------------------------------------------------------------------------------------------------
def _hf_config(config: GPT2Config, dropout: float, attn: str):
    import transformers

    d = config.to_hf_dict() | dict(embd_pdrop=dropout, resid_pdrop=dropout, attn_pdrop=dropout)
    return transformers.GPT2Config(**d, attn_implementation=attn)


def build_hf(config: GPT2Config, opts: Options, device: torch.device, attn: str = "eager"):
    """A transformers ``GPT2LMHeadModel`` with its own random initialisation (seeded), fp32, in train mode."""
    import transformers

    torch.manual_seed(opts.seed)
    with torch.device(device):
        model = transformers.GPT2LMHeadModel(_hf_config(config, opts.dropout, attn))
    return model.train()


def _native(config: GPT2Config, opts: Options, device: torch.device) -> GPT2:
    hf = build_hf(config, opts, device)  # the same initial weights as the transformers providers
    model = GPT2.from_hf(hf, dtype=torch.float32, device=device, backend="auto")
    del hf
    return model.train().requires_grad_(True)


def _patched(config: GPT2Config, opts: Options, device: torch.device):
    from gpt2fast.hf_patch import patch_hf

    return patch_hf(build_hf(config, opts, device), backend="auto").train()


def _compile_backend(opts: Options, device: torch.device) -> str:
    return opts.compile_backend or ("inductor" if device.type == "cuda" else "aot_eager")


def step_models(config: GPT2Config, opts: Options, device: torch.device) -> Iterator[tuple[str, Callable]]:
    """``(provider, factory)``; a factory returns ``(module to optimise, callable(ids, labels) -> loss)``."""

    def hf(attn: str):
        def make():
            model = build_hf(config, opts, device, attn)
            return model, lambda ids, labels: model(input_ids=ids, labels=labels).loss

        return make

    def patched():
        model = _patched(config, opts, device)
        return model, lambda ids, labels: model(input_ids=ids, labels=labels).loss

    def native(compiled: bool):
        def make():
            model = _native(config, opts, device)
            run = torch.compile(model, backend=_compile_backend(opts, device)) if compiled else model
            return model, lambda ids, labels: run(ids, labels=labels).loss

        return make

    yield EAGER, hf("eager")
    yield SDPA, hf("sdpa")
    yield PATCHED, patched
    yield NATIVE, native(False)
    yield COMPILED, native(True)


# ---- measuring -------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _peak_reset(device: torch.device) -> int | None:
    """Reset the CUDA peak counter; returns the bytes allocated now (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def _record(case: str, provider: str, opts: Options, **shape) -> dict:
    return {
        "case": case,
        "provider": provider,
        "size": shape.get("size"),
        "shape": {k: v for k, v in shape.items() if k != "size"},
        "autocast": None if opts.autocast is None else str(opts.autocast).replace("torch.", ""),
        "dropout": opts.dropout,
        "error": None,
        "time": None,
        "step_ms": None,
        "tokens_per_s": None,
        "peak_mem_bytes": None,
        "loss": None,
        "ratios": {},
        "ops_dispatched": None,
    }


def _dispatches(fn: Callable[[], object]) -> dict[str, int]:
    """``"op@backend": calls`` of the gpt2fast ops one call of ``fn`` dispatches (eagerly)."""
    from gpt2fast.testing.conformance import count_dispatches

    with count_dispatches() as counts:
        fn()
    return {f"{op}@{backend}": n for (op, backend), n in sorted(counts.items())}


def measure_step(factory: Callable, ids: torch.Tensor, opts: Options, device: torch.device, rec: dict) -> None:
    """Fill ``rec`` with the step time, tokens/s, peak memory, first loss and the ops one step dispatches."""
    model, loss_of = factory()
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr, fused=device.type == "cuda")
    losses: list[float] = []

    def step() -> None:
        with _autocast(device, opts.autocast):
            loss = loss_of(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if not losses:
            losses.append(float(loss))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = time_cpu(step, reps=1, warmup=0, budget_s=0)  # compiles, allocates the AdamW states
        rec["first_step_s"] = first.median_ms / 1e3
        rec["loss"] = losses[0]
        _peak_reset(device)
        timing = time_cpu(step, reps=opts.steps, warmup=opts.warmup, budget_s=120)
        rec["peak_mem_bytes"] = _peak(device)
        if rec["provider"] != COMPILED:  # counting wraps the registry's functions: no recompiles in the timing
            rec["ops_dispatched"] = _dispatches(step)
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}"[:300] for w in caught))
    if messages:
        rec["warnings"] = messages[:5]
    rec["time"] = timing.as_dict()
    rec["step_ms"] = timing.median_ms
    rec["tokens_per_s"] = ids.numel() * 1e3 / timing.median_ms
    if rec["provider"] == PATCHED and rec["ops_dispatched"] == {}:
        rec["note"] = "patch_hf ran no gpt2fast op in this training step (transformers' own code ran)"


def _fwd_bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """Forward + backward of the scalar ``fn()``; the gradients are dropped again."""

    def run() -> None:
        fn().backward()
        for t in inputs:
            t.grad = None

    return run


def _bwd(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    """The backward alone of ``fn()`` (run once here), with a fixed random output gradient."""
    out = fn()
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def _time_component(run: Callable[[], None], device: torch.device, opts: Options, rec: dict) -> None:
    def synced() -> None:
        run()
        sync(device)

    synced()
    base = _peak_reset(device)
    timing = time_cpu(synced, reps=opts.steps, warmup=opts.warmup, budget_s=30)
    peak = _peak(device)
    rec["time"], rec["step_ms"] = timing.as_dict(), timing.median_ms
    rec["peak_mem_bytes"] = None if peak is None else peak - base


def component_runs(
    config: GPT2Config, opts: Options, device: torch.device
) -> Iterator[tuple[str, dict, Callable[[], dict]]]:
    """``(case, shape, factory)`` of the loss-head and attention cases.  A factory makes the case's inputs and
    returns ``{provider: make}``; ``make()`` returns the call to time (an error there is that provider's)."""
    dtype, C, H = opts.component_dtype, config.n_embd, config.n_head
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(device=device, dtype=dtype).requires_grad_(True)

    for n, v in opts.loss_cases:

        def loss_runs(n=n, v=v) -> dict:
            hidden, weight = randn(n, C), randn(v, C, std=0.02)
            labels = torch.randint(0, v, (n,), generator=gen).to(device)
            full = lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels)
            fused = lambda: ops.linear_cross_entropy(hidden, weight, labels)
            return {
                "torch": lambda: _fwd_bwd(full, [hidden, weight]),
                NATIVE: lambda: _fwd_bwd(fused, [hidden, weight]),
            }

        yield "loss", dict(rows=n, vocab=v, width=C), loss_runs
    for b, t, d in opts.attention_cases:

        def attention_runs(b=b, t=t, d=d) -> dict:
            q, k, v_ = (randn(b, H, t, d) for _ in range(3))
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v_, is_causal=True)
            own = lambda: ops.attention(q, k, v_, causal=True)
            return {"torch.sdpa": lambda: _bwd(sdpa, [q, k, v_]), NATIVE: lambda: _bwd(own, [q, k, v_])}

        yield "attention_backward", dict(batch=b, heads=H, seq=t, head_dim=d), attention_runs


# ---- the run ---------------------------------------------------------------------------------------------------
def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _cleanup(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def iter_records(device: torch.device, opts: Options) -> Iterator[dict]:
    """Every step record (per size, shape, provider), then the component records; one at a time."""
    opts.validate()
    for size, (batch, seq) in product(opts.sizes, opts.shapes):
        config = GPT2Config.from_name(size)
        g = torch.Generator(device="cpu").manual_seed(opts.seed)
        ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
        group: dict[str, dict] = {}
        for name, factory in step_models(config, opts, device):
            if opts.providers is not None and name not in opts.providers:
                continue
            opts.log(f"train {size} {batch}x{seq} {name}")
            rec = _record("step", name, opts, size=size, batch=batch, seq=seq)
            try:
                measure_step(factory, ids, opts, device, rec)
            except Exception as exc:  # a failing provider is data, not the end of the run
                rec["error"] = _error(exc)
            finally:
                _cleanup(device)
            group[name] = rec
            _ratios(rec, group)
            yield rec
    if not opts.components:
        return
    for size in opts.sizes:
        config = GPT2Config.from_name(size)
        for case, shape, factory in component_runs(config, opts, device):
            opts.log(f"train {case} {size} {shape}")
            try:
                makers = factory()
            except Exception as exc:  # the inputs could not be made: one record says so
                rec = _record(case, "(inputs)", opts, size=size, **shape)
                rec["error"] = _error(exc)
                yield rec
                continue
            group = {}
            for provider, make in makers.items():
                rec = _record(case, provider, opts, size=size, **shape)
                rec["autocast"] = str(opts.component_dtype).replace("torch.", "")  # the inputs' dtype, no autocast
                try:
                    _time_component(make(), device, opts, rec)
                except Exception as exc:
                    rec["error"] = _error(exc)
                group[provider] = rec
                _ratios(rec, group)
                yield rec
            _cleanup(device)


def _ratios(rec: dict, group: dict[str, dict]) -> None:
    """gpt2fast's figures over the baselines' in the same group (filled when the gpt2fast record comes)."""
    if rec["error"] is not None or not rec["provider"].startswith("gpt2fast"):
        return
    for name, base in group.items():
        if name.startswith("gpt2fast") or base["error"] is not None:
            continue
        rec["ratios"]["time_vs_" + name] = rec["step_ms"] / base["step_ms"]
        if rec["tokens_per_s"] and base["tokens_per_s"]:
            rec["ratios"]["tokens_per_s_vs_" + name] = rec["tokens_per_s"] / base["tokens_per_s"]
        if rec["peak_mem_bytes"] and base["peak_mem_bytes"]:
            rec["ratios"]["peak_mem_vs_" + name] = rec["peak_mem_bytes"] / base["peak_mem_bytes"]
    rec["targets"] = {
        k: {"target": f"{op} {bound}", "met": rec["ratios"][k] >= bound if op == ">=" else rec["ratios"][k] <= bound}
        for k, (op, bound) in TARGETS.items()
        if k in rec["ratios"]
    }


# ---- the table -------------------------------------------------------------------------------------------------
def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def _mib(x: int | None) -> str:
    return "–" if x is None else f"{x / 2**20:.0f}"


def table_rows(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Column names and one row per record (for the CLI table and the markdown)."""
    cols = ["case", "size", "shape", "provider", "ms", "tokens/s", "peak MiB", "loss", "vs baselines"]
    rows = []
    for r in doc["records"]:
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items())
        head = [r["case"], str(r["size"]), shape, r["provider"]]
        if r["error"] is not None:
            rows.append([*head, "error: " + r["error"][:70], "", "", "", ""])
            continue
        ratios = ", ".join(f"{k.replace('_vs_', ' / ')} {v:.2f}x" for k, v in r["ratios"].items())
        if r.get("note"):
            ratios = (ratios + "; " if ratios else "") + r["note"]
        row = [_fmt(r["step_ms"]), _fmt(r["tokens_per_s"]), _mib(r["peak_mem_bytes"]), _fmt(r["loss"]), ratios]
        rows.append([*head, *row])
    return cols, rows


def markdown(doc: dict) -> str:
    """Markdown for a ``kind == "train"`` document."""
    from gpt2fast.bench.report import _header

    cols, rows = table_rows(doc)
    lines = [_header(doc), "", f"Autocast: {doc['records'][0]['autocast'] if doc['records'] else '–'}; targets "
             f"(GPU, unverified until a run): tokens/s >= 1.3x {SDPA}, peak memory <= 0.6x {EAGER}.", ""]  # fmt: skip
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
