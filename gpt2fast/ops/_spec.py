"""What declaring an op takes: an :class:`OpSpec`, one per op module in ``gpt2fast/ops/specs/``.

A spec holds everything about an op that does not depend on a backend: its public function (signature,
docstring, shared validation, dispatch), its reference implementation, how to make inputs for a shape, the
shapes the tests use, the bad inputs the validation must refuse, the valid inputs that some backends may
decline, and the benchmark cases with their minimal traffic, check slice and baselines.  The conformance
tests, ``gpt2fast parity``, ``gpt2fast bench kernels`` and ``docs/bad_inputs.md`` are all driven by the
registered specs, so a new op needs nothing else (see ``gpt2fast/ops/README.md``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gpt2fast.ops._validate import FLOAT_DTYPES

#: The keyword arguments of one op call (the spec's ``args`` plus nothing else).
Inputs = dict[str, Any]
#: A benchmark provider: turns inputs into a zero-argument call returning the op's output.
Provider = Callable[[Inputs], Callable[[], Any]]


@dataclass(frozen=True)
class BadInput:
    """An input the shared validation refuses, on every backend, before any backend is reached."""

    id: str
    input: str  # what is wrong, in words (docs/bad_inputs.md)
    make: Callable[[], Inputs]  # the op's keyword arguments (CPU tensors)
    exc: type[BaseException]
    match: str  # a regex the message must match: it names the argument and what was expected


@dataclass(frozen=True)
class EdgeInput:
    """A valid input (a layout, a size) that a backend may decline through its ``supports`` predicate.

    Every backend either declines it with a reason (a named call then raises that reason before any launch,
    "auto" falls through) or runs it and must match the reference."""

    id: str
    input: str
    make: Callable[[torch.device], Inputs]


@dataclass(frozen=True)
class View:
    """Another memory layout of the same input values (a transposed or sliced view), for the stride tests."""

    id: str
    apply: Callable[[Inputs], Inputs]


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked shape: ``sweep`` names the x-axis key of ``shape``, ``group`` one plot line set."""

    op: str
    shape: dict
    sweep: str
    group: str
    target: bool = False  # one of the shapes the performance targets are stated for


@dataclass(frozen=True)
class Traffic:
    """Minimal bytes moved (every input read once, every output written once) and FLOPs of one call."""

    bytes: int
    flops: float | None = None
    extra: dict = field(default_factory=dict)  # more figures, e.g. the KV-cache bytes of decode


#: Rows of the row-wise ops' (layer_norm, bias_gelu) benchmark sweeps.
BENCH_ROWS = {
    "full": [1, 64, 512, 2048, 8192, 16384, 32768, 65536],
    "quick": [1, 1024, 16384, 65536],
    "cpu": [1, 7, 64],
}


def row_count(shape: dict) -> int:
    """The rows of a row-wise op's shape: ``rows`` is a count or a tuple of leading dims."""
    rows = shape["rows"]
    return math.prod(rows) if isinstance(rows, tuple) else rows


def row_cases(op: str, sweep: str, widths: dict[str, list[int]], **flags: list) -> list[BenchCase]:
    """A row-wise op's cases: every width of ``widths[sweep]`` x every combination of ``flags`` (name -> values,
    e.g. ``residual=[False, True]``, each a plot line) x :data:`BENCH_ROWS` rows; the targets are >= 16k rows."""
    combos = [{}]
    for name, values in flags.items():
        combos = [{**c, name: v} for c in combos for v in values]
    cases = []
    for n in widths[sweep]:
        for combo in combos:
            group = " ".join([f"N={n}", *(f"+{k}" for k, v in combo.items() if v)])
            cases += [BenchCase(op, dict(rows=r, n=n, **combo), "rows", group, r >= 16384) for r in BENCH_ROWS[sweep]]
    return cases


def _no_cases(sweep: str) -> list[BenchCase]:
    return []


def _whole(shape: dict, inputs: Inputs) -> Inputs:
    return inputs


def _whole_outputs(shape: dict, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return outputs


def _no_baselines(device: torch.device) -> dict[str, Provider | str]:
    return {}


def _element_traffic(shape: dict, dtype: torch.dtype) -> Traffic:
    return Traffic(0)


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op except its backends' implementations."""

    name: str
    op: Callable  # the public function: op(*args, backend=None); validates, then dispatches
    args: tuple[str, ...]  # the arguments an implementation takes, in order
    reference: Callable  # plain PyTorch in the input dtype: the parity oracle
    make_inputs: Callable[[dict, torch.dtype, torch.device, torch.Generator], Inputs]
    test_shapes: tuple[dict, ...]  # small and odd on purpose (they also run under Triton's interpreter)
    gpu_shapes: tuple[dict, ...] = ()  # larger ones, run only on a GPU
    grad_args: tuple[str, ...] = ()  # the arguments gradients flow to (differentiable implementations back-propagate)
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    mutates: tuple[str, ...] = ()  # arguments written in place (compared with the reference's after the call)
    views: tuple[View, ...] = ()  # op-specific layouts, besides the generic ones of gpt2fast.testing
    bad_inputs: tuple[BadInput, ...] = ()
    edge_inputs: tuple[EdgeInput, ...] = ()
    invariants: Callable[[dict, Inputs, list[torch.Tensor]], None] | None = None  # exact properties to assert
    shape_strategy: Callable[[int], Any] | None = None  # size -> a Hypothesis strategy of shapes
    bench_cases: Callable[[str], list[BenchCase]] = _no_cases  # "full" / "quick" / "cpu" -> cases
    traffic: Callable[[dict, torch.dtype], Traffic] = _element_traffic
    check_inputs: Callable[[dict, Inputs], Inputs] = _whole  # a slice small enough for the oracle
    check_outputs: Callable[[dict, list[torch.Tensor]], list[torch.Tensor]] = _whole_outputs  # the same slice
    baselines: Callable[[torch.device], dict[str, Provider | str]] = _no_baselines  # other libraries' versions

    @classmethod
    def from_module(cls, module_name: str) -> OpSpec:
        """The spec an op module declares by convention: the public function named like the module, ``ARGS``,
        ``reference``, ``make_inputs``, ``TEST_SHAPES``, and, when present, ``GRAD_ARGS``, ``GPU_SHAPES``, ``DTYPES``,
        ``MUTATES``, ``VIEWS``, ``BAD_INPUTS``, ``EDGE_INPUTS``, ``invariants``, ``shape_strategy``,
        ``bench_cases``, ``traffic``, ``check_inputs``, ``check_outputs`` and ``baselines``."""
        mod = sys.modules[module_name]
        name = module_name.rsplit(".", 1)[-1]
        given = {field: getattr(mod, attr) for field, attr in _MODULE_FIELDS.items() if hasattr(mod, attr)}
        return cls(name=name, op=getattr(mod, name), **given)

    def call(self, inputs: Inputs, backend: str | None = None):
        """Run the public op on ``inputs`` (keyword arguments) with ``backend``."""
        return self.op(**inputs, backend=backend)

    def run_reference(self, inputs: Inputs) -> list[torch.Tensor]:
        """The reference implementation on ``inputs``, outputs as a list."""
        return as_list(self.reference(*(inputs[a] for a in self.args)))


#: OpSpec field -> the module-level name :meth:`OpSpec.from_module` reads it from.
_MODULE_FIELDS = {
    "args": "ARGS",
    "grad_args": "GRAD_ARGS",
    "reference": "reference",
    "make_inputs": "make_inputs",
    "test_shapes": "TEST_SHAPES",
    "gpu_shapes": "GPU_SHAPES",
    "dtypes": "DTYPES",
    "mutates": "MUTATES",
    "views": "VIEWS",
    "bad_inputs": "BAD_INPUTS",
    "edge_inputs": "EDGE_INPUTS",
    "invariants": "invariants",
    "shape_strategy": "shape_strategy",
    "bench_cases": "bench_cases",
    "traffic": "traffic",
    "check_inputs": "check_inputs",
    "check_outputs": "check_outputs",
    "baselines": "baselines",
}


def as_list(out) -> list[torch.Tensor]:
    """An op's output (a tensor or a tuple of them) as a list."""
    return list(out) if isinstance(out, (tuple, list)) else [out]


def shape_id(shape: dict) -> str:
    """A short test id for a shape dict, e.g. ``rows=3,n=100``."""
    parts = []
    for k, v in shape.items():
        if isinstance(v, (tuple, list)):
            v = "x".join(map(str, v)) if v else "()"
        parts.append(f"{k}={v}")
    return ",".join(parts)


def seeded_randn(gen: torch.Generator, device: torch.device, dtype: torch.dtype):
    """``randn(*shape, std=1.0)``: seeded normal values drawn on the CPU, then moved to ``device``/``dtype``."""

    def randn(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(device=device, dtype=dtype)

    return randn
