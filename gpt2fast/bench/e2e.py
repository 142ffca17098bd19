"""End-to-end generation benchmark: gpt2fast against transformers on the same random weights shape.

Every provider is timed the same way, through its ``generate``: the wall time of
generating 1 token is the prefill latency, and ``(t(new) - t(1)) / (new - 1)`` the
decode time per token.  Weights are random (no download): ``GPT2.random`` for
gpt2fast, transformers' own initialisation of ``GPT2LMHeadModel(GPT2Config(...))``.

The roofline fraction compares a decode step with the least time it could take:
the bytes it must read (all weights, the tied LM head in full, and the KV cache at
the mean context length) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from gpt2fast import GPT2, GPT2Config, ops
from gpt2fast.bench import roofline
from gpt2fast.bench.timing import sync, time_cpu

EAGER = "transformers"


@dataclass
class Options:
    """What to run: sizes, batches, prompt/new lengths, dtype, repetitions and which providers."""

    sizes: tuple[str, ...] = ("gpt2",)  # GPT2Config.from_name names: a published size, or "tiny" (CPU runs)
    batches: tuple[int, ...] = (1, 8, 64)
    prompt: int = 128
    new: int = 128
    dtype: torch.dtype = torch.float16
    reps: int = 3
    hf_compile: bool = True
    hf_compile_batches: tuple[int, ...] | None = None  # batches to run it at (None: all); each one recompiles
    providers: tuple[str, ...] | None = None  # a subset of provider names (None: all)
    seed: int = 0
    log: Callable[[str], None] = field(default=print)

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad option."""
        if self.prompt < 1:
            raise ValueError(f"--prompt must be >= 1, got {self.prompt}")
        if self.new < 2:
            raise ValueError(f"--new must be >= 2 (decode time is t(new) - t(1)), got {self.new}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"--batch values must be >= 1, got {list(self.batches)}")
        for size in self.sizes:
            cfg = GPT2Config.from_name(size)
            if self.prompt + self.new > cfg.n_positions:
                raise ValueError(
                    f"--prompt + --new = {self.prompt + self.new} exceeds {size}'s n_positions={cfg.n_positions}"
                )


# ---- models ------------------------------------------------------------------------------
def build_hf(config: GPT2Config, dtype: torch.dtype, device: torch.device, seed: int):
    """transformers ``GPT2LMHeadModel`` with its own random initialisation (no download)."""
    import transformers

    torch.manual_seed(seed)
    hf_cfg = transformers.GPT2Config(**config.to_hf_dict())
    with torch.device(device):
        model = transformers.GPT2LMHeadModel(hf_cfg)
    return model.to(dtype=dtype).eval().requires_grad_(False)


def _hf_generate(model, ids: torch.Tensor, n: int, **extra) -> torch.Tensor:
    eos = model.config.eos_token_id
    mask = torch.ones_like(ids)
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=eos, **extra
    )


@dataclass
class Runner:
    """A provider ready to run: ``generate(ids, n)``, and ``prepare_step(ids)`` making one decode step (the
    forward: layers and LM head) for the profiler; ``prepare_select(ids)`` the token selection after it (greedy),
    when the provider has its own.  A step may carry ``step.reset()``, run before each call, unprofiled."""

    generate: Callable[[torch.Tensor, int], torch.Tensor]
    prepare_step: Callable[[torch.Tensor], Callable[[], object]] | None
    launches_note: str | None = None
    prepare_select: Callable[[torch.Tensor], Callable[[], object]] | None = None


def _hf_runner(model, **extra) -> Runner:
    def prepare(ids: torch.Tensor) -> Callable[[], object]:
        # transformers >= 5.2x names the cache argument/output "cache"; before, "past_key_values".
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = model(ids, use_cache=True)
        past, nxt = out[key], out.logits[:, -1:].argmax(-1)

        def step():
            with torch.no_grad():
                return model(nxt, use_cache=True, **{key: past})

        return step

    return Runner(lambda ids, n: _hf_generate(model, ids, n, **extra), prepare)


def _gpt2fast_runner(model: GPT2, use_cuda_graph: bool | None = False) -> Runner:
    def prepare(ids: torch.Tensor) -> Callable[[], object]:
        model.setup_cache(ids.shape[0], ids.shape[1] + 1)
        nxt = model.prefill(ids).argmax(-1)
        cache = model.cache
        seqlens, host_max = cache.seqlens.clone(), getattr(cache, "host_max", None)

        def reset() -> None:
            cache.seqlens.copy_(seqlens)  # decode at the same position every time
            if host_max is not None:
                cache.host_max = host_max

        def step():
            return model.decode_step(nxt, check_ids=False)

        step.reset = reset
        return step

    def prepare_select(ids: torch.Tensor) -> Callable[[], object]:
        from gpt2fast.generation import DecodeState
        from gpt2fast.sampling import SamplingConfig, TokenHistory

        lengths = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int32, device=ids.device)
        history = TokenHistory.from_prompts(ids, lengths, ids.shape[1] + 2)
        state = DecodeState(SamplingConfig(), history, None, 0, None)
        logits = torch.zeros(ids.shape[0], model.config.vocab_size, dtype=model.wte.weight.dtype, device=ids.device)
        snapshot = state.history.lengths.clone()

        def select():
            return state.select(logits)

        select.reset = lambda: state.history.lengths.copy_(snapshot)
        return select

    def generate(ids: torch.Tensor, n: int) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=n, use_cuda_graph=use_cuda_graph)

    return Runner(generate, prepare, prepare_select=prepare_select)


def providers(
    config: GPT2Config, opts: Options, device: torch.device, batch: int
) -> Iterator[tuple[str, Callable[[], Runner]]]:
    """(name, factory) of every provider at ``batch``; a factory builds its model and may raise (recorded)."""
    dtype, seed = opts.dtype, opts.seed
    yield EAGER, lambda: _hf_runner(build_hf(config, dtype, device, seed))
    compile_here = opts.hf_compile_batches is None or batch in opts.hf_compile_batches
    if device.type == "cuda" and opts.hf_compile and compile_here:
        yield "transformers+static+compile", lambda: _hf_compiled(config, dtype, device, seed)
    yield "transformers+patch_hf", lambda: _hf_patched(config, dtype, device, seed)
    for status in ops.available_backends(device):
        if status.available:
            yield "gpt2fast:" + status.name, _own_factory(config, dtype, device, seed, status.name, False)
    if device.type == "cuda":
        yield "gpt2fast:auto+cuda_graph", _own_factory(config, dtype, device, seed, None, True)


def _own_factory(config, dtype, device, seed, backend: str | None, graph: bool) -> Callable[[], Runner]:
    def make() -> Runner:
        if graph:
            importlib.import_module("gpt2fast.cuda_graph")  # without it generate would silently run eagerly
        model = GPT2.random(config, seed=seed, dtype=dtype, device=device, backend=backend)
        runner = _gpt2fast_runner(model, use_cuda_graph=graph)
        if graph:  # the step's kernels are the graph's: counted on the eager step; the host launches one graph
            runner.launches_note = "kernels inside the CUDA graph (counted on the eager step); one graph launch a step"
        return runner

    return make


def _hf_compiled(config: GPT2Config, dtype: torch.dtype, device: torch.device, seed: int) -> Runner:
    """transformers' recipe for fast generation: a static cache, with which ``generate`` compiles the
    decoding forward itself (transformers >= 4.48 on CUDA); older versions get the forward compiled here."""
    model = build_hf(config, dtype, device, seed)
    if not hasattr(model, "_valid_auto_compile_criteria"):
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    return _hf_runner(model, cache_implementation="static")


def _hf_patched(config: GPT2Config, dtype: torch.dtype, device: torch.device, seed: int) -> Runner:
    from gpt2fast.hf_patch import patch_hf

    return _hf_runner(patch_hf(build_hf(config, dtype, device, seed)))


# ---- launch counting ---------------------------------------------------------------------
#: aten ops that never launch a kernel: views, metadata, allocation (an op that copies has a ``copy_`` child).
NO_KERNEL_OPS = frozenset(
    "aten::" + name
    for name in (
        "view", "_unsafe_view", "reshape", "_reshape_alias", "view_as", "as_strided", "select", "slice", "narrow",
        "unsqueeze", "squeeze", "transpose", "t", "permute", "expand", "expand_as", "alias", "unbind", "split",
        "split_with_sizes", "chunk", "detach", "contiguous", "empty", "empty_strided", "empty_like", "resolve_conj",
        "resolve_neg", "lift_fresh", "result_type", "size", "stride", "is_nonzero", "_local_scalar_dense", "item",
        "to", "type_as", "numpy_T", "set_", "_has_compatible_shallow_copy_type", "broadcast_tensors", "resize_",
    )
)  # fmt: skip
#: Profiler range around each Triton launch run by the interpreter (its aten ops are the interpreter's, not ours).
TRITON_RANGE = "triton::"


@dataclass
class Launches:
    """Kernel launches of one decode step: the total, by kernel or op name, and how they were counted."""

    total: int
    by_name: dict[str, int]
    method: str


def _is_kernel_op(event) -> bool:
    """An aten op that runs a kernel itself: not a view or allocation, not the copy of a Python scalar into a 0-dim
    tensor (``x + 1``), and no aten op under it does the work."""
    if not event.name.startswith("aten::") or event.name in NO_KERNEL_OPS:
        return False
    shapes = [s for s in event.input_shapes or [] if isinstance(s, list)]
    if event.name == "aten::copy_" and shapes and all(s == [] for s in shapes):
        return False
    return not any(c.name.startswith("aten::") and c.name not in NO_KERNEL_OPS for c in event.cpu_children)


def _inside_triton(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(TRITON_RANGE):
            return True
        parent = parent.cpu_parent
    return False


@contextmanager
def _triton_ranges():
    """Wrap every interpreted Triton launch in a profiler range named ``triton::<kernel>`` (no-op when Triton
    does not run interpreted)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        yield
        return
    from torch.profiler import record_function

    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        with record_function(TRITON_RANGE + getattr(self.fn, "__name__", str(self.fn))):
            return real(self, *args, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = real


def count_launches(step: Callable[[], object], device: torch.device) -> Launches:
    """The launches of one call of ``step`` (run once before, to warm up), from the torch profiler.

    On a GPU: every kernel, memcpy and memset on the device.  On CPU, where nothing launches, what would: each
    aten op that does work itself (:func:`_is_kernel_op`: not a view, not a wrapper of another op), plus each
    Triton kernel the interpreter runs (counted once, whatever aten ops it uses inside).
    """
    from torch.profiler import ProfilerActivity, profile

    reset = getattr(step, "reset", lambda: None)
    reset()
    step()
    sync(device)
    reset()
    sync(device)
    counts: Counter = Counter()
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(device)
        counts.update(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        method = "torch profiler: CUDA kernels, memcpy and memset"
    else:
        with _triton_ranges(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        for e in prof.events():
            if e.name.startswith(TRITON_RANGE) or (_is_kernel_op(e) and not _inside_triton(e)):
                counts[e.name] += 1
        method = "torch profiler on CPU: aten ops that do work + Triton launches (interpreter)"
    return Launches(sum(counts.values()), dict(counts.most_common()), method)


# ---- measuring ---------------------------------------------------------------------------


def _record(size: str, provider: str, opts: Options, batch: int) -> dict:
    return {
        "size": size,
        "provider": provider,
        "dtype": str(opts.dtype).replace("torch.", ""),
        "batch": batch,
        "prompt": opts.prompt,
        "new": opts.new,
        "error": None,
        "prefill_ms": None,
        "decode_ms_per_token": None,
        "decode_tokens_per_s": None,
        "e2e_tokens_per_s": None,
        "step_bytes": None,
        "roofline_fraction": None,
        "launches_per_step": None,
        "speedup": {},
        "time_prefill": None,
        "time_total": None,
    }


def measure(runner: Runner, ids: torch.Tensor, opts: Options, device: torch.device, rec: dict) -> None:
    """Fill the timing fields of ``rec`` from ``runner`` on prompts ``ids``."""

    def gen(n: int) -> Callable[[], None]:
        def run() -> None:
            out = runner.generate(ids, n)
            sync(device)
            if out.shape[1] != ids.shape[1] + n:
                raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {n}")

        return run

    with warnings.catch_warnings(record=True) as caught:  # e.g. a CUDA graph capture that fell back to eager
        warnings.simplefilter("always")
        t1 = time_cpu(gen(1), reps=opts.reps, warmup=1, budget_s=30)
        tn = time_cpu(gen(opts.new), reps=opts.reps, warmup=1, budget_s=60)
    messages = list(dict.fromkeys(f"{w.category.__name__}: {w.message}"[:300] for w in caught))
    if messages:
        rec["warnings"] = messages[:5]
    batch = ids.shape[0]
    rec["time_prefill"], rec["time_total"] = t1.as_dict(), tn.as_dict()
    rec["prefill_ms"] = t1.median_ms
    rec["e2e_tokens_per_s"] = batch * opts.new * 1e3 / tn.median_ms
    if tn.median_ms > t1.median_ms:
        rec["decode_ms_per_token"] = (tn.median_ms - t1.median_ms) / (opts.new - 1)
        rec["decode_tokens_per_s"] = batch * 1e3 / rec["decode_ms_per_token"]
    else:  # timing noise larger than the decode time (tiny runs on a busy CPU): no figure rather than a wrong one
        rec["note"] = f"decode time not resolved: t({opts.new} tokens) <= t(1 token); use more --new or --reps"
    if runner.launches_note:
        rec["launches_note"] = runner.launches_note
    if runner.prepare_step is not None:
        try:
            launches = count_launches(runner.prepare_step(ids), device)
        except Exception as exc:
            rec["launches_note"] = f"profiler failed: {type(exc).__name__}: {exc}"[:300]
        else:
            rec["launches_per_step"] = launches.total
            rec["launches_by_name"] = launches.by_name
            rec["launches_method"] = launches.method
    if runner.prepare_select is not None:
        try:
            rec["select_launches_per_step"] = count_launches(runner.prepare_select(ids), device).total
        except Exception as exc:
            rec["launches_note"] = f"profiler failed on the token selection: {type(exc).__name__}: {exc}"[:300]


def _roofline(rec: dict, config: GPT2Config, opts: Options, peaks: dict | None) -> None:
    batch = rec["batch"]
    context = opts.prompt + (opts.new - 1) / 2  # mean cached length over the decode steps
    step_bytes = roofline.weight_bytes_per_decode_step(config, batch, opts.dtype)
    step_bytes += roofline.kv_bytes_per_decode_step(config, batch, context, opts.dtype)
    rec["step_bytes"] = step_bytes
    if peaks and rec["decode_ms_per_token"]:
        floor_ms = step_bytes / (peaks["copy_gbps"] * 1e9) * 1e3
        rec["roofline_fraction"] = floor_ms / rec["decode_ms_per_token"]


#: Providers run after every other (size, batch): compiling is slow, and a time-boxed run keeps the rest.
SLOW = ("transformers+static+compile",)


def _plan(opts: Options, device: torch.device) -> list[tuple[str, GPT2Config, int, str, Callable[[], Runner]]]:
    """(size, config, batch, provider, factory) in run order: the slow providers last."""
    plan = []
    for size in opts.sizes:
        config = GPT2Config.from_name(size)
        for batch in opts.batches:
            for name, factory in providers(config, opts, device, batch):
                if opts.providers is None or name in opts.providers:
                    plan.append((size, config, batch, name, factory))
    return sorted(plan, key=lambda p: p[3] in SLOW)  # stable: otherwise the given order


def iter_records(device: torch.device, opts: Options, peaks: dict | None) -> Iterator[dict]:
    """Run every (size, batch, provider), yielding one record each (transformers eager first in a group)."""
    opts.validate()
    eager: dict[tuple[str, int], dict] = {}
    for size, config, batch, name, factory in _plan(opts, device):
        g = torch.Generator(device="cpu").manual_seed(opts.seed)
        ids = torch.randint(0, config.vocab_size, (batch, opts.prompt), generator=g).to(device)
        opts.log(f"e2e {size} batch={batch} {name}")
        rec = _record(size, name, opts, batch)
        try:
            measure(factory(), ids, opts, device, rec)
            _roofline(rec, config, opts, peaks)
        except Exception as exc:  # a failing provider is recorded, not fatal
            rec["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
        if name == EAGER and rec["error"] is None:
            eager[(size, batch)] = rec
        _speedup(rec, eager.get((size, batch)))
        yield rec


def _speedup(rec: dict, base: dict | None) -> None:
    """Tokens/s of ``rec`` over transformers eager's (same size and batch), decode and end to end."""
    if base is None or rec is base or rec["error"] is not None:
        return
    rec["speedup"] = {EAGER + " e2e": rec["e2e_tokens_per_s"] / base["e2e_tokens_per_s"]}
    if rec["decode_tokens_per_s"] and base["decode_tokens_per_s"]:
        rec["speedup"][EAGER + " decode"] = rec["decode_tokens_per_s"] / base["decode_tokens_per_s"]
