"""Compile every Triton kernel of gpt2fast, offline, for Hopper (sm_90) and Ampere (sm_80).

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` runs
the whole pipeline down to a cubin with the ptxas Triton ships.  The kernels are found through the op
registry: the module of every registered ``triton`` implementation lists the specialisations it can
launch on each target (``compile_cases(full, arch)``): by default the heuristic config of every
dtype / shape class plus every autotune config at GPT-2's own shape (a representative subset, to
stay near a minute on two cores); ``--full`` compiles every combination.  The autotuners prune,
per GPU generation, dtype and head dim, the configs that spill registers there (the tables in
``gpt2fast/ops/triton/_tuning.py``), and ``compile_cases`` applies the same pruning for its
target, so each target compiles exactly the configs a launch on that GPU could use.

For each compiled kernel it reports registers per thread, spilled bytes (from the cubin's
resource usage: local memory) and dynamic shared memory (Triton's metadata).  A compile
error fails the run.  A heuristic config that needs more shared memory than the target has
fails too (autotune configs that do not fit are skipped by the autotuner at run time, so
they are only listed).  Spills are printed as defects; ``--fail-on-spill`` makes them fatal.

    python benchmarks/compile_check.py [--full] [--fail-on-spill] [--json out.json] [--jobs N]
                                       [--targets 90,80] [--only attention,decode_split,...]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's gpt2fast, installed or not
os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels, not interpreter stand-ins
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated to silence its warning

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from gpt2fast import ops
from gpt2fast.ops._registry import get_impl
from gpt2fast.ops.triton._common import CompileCase

#: The backend whose kernels are compiled.
BACKEND = "triton"

#: Integer arguments (by name prefix) that are multiples of 16 in every GPT-2 launch.
ALIGNED = ("stride", "N")

#: Compute capability -> (name, usable shared memory per block in bytes).
TARGETS = {90: ("sm_90", 232448), 80: ("sm_80", 166912)}

_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str | None:
    here = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(here) if here.exists() else None


def _resources(cubin: bytes) -> dict[str, int]:
    """Registers and spills of a cubin, read with the cuobjdump Triton ships.

    A spill is a local-memory store (``STL``) in the SASS; the stack frame size then gives the
    bytes.  (A stack frame alone is not a spill: ptxas may reserve a few bytes without one.)
    """
    tool = _cuobjdump()
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    m = _RESOURCE.search(usage)
    if not m:
        return {}
    reg, stack, _static_shared, local = map(int, m.groups())
    stores = len(re.findall(r"\bSTL(?:\.\w+)*\s", sass))
    return {"regs": reg, "spill_stores": stores, "spill_bytes": (stack + local) if stores else 0}


def _attrs(case: CompileCase) -> dict:
    """Pointers and strides/row lengths are multiples of 16 (as the JIT specialises them for torch
    allocations and GPT-2's head dims and widths); unit strides are passed as constexpr 1 by the cases."""
    names = list(case.signature)
    aligned = [n for n, t in case.signature.items() if t.startswith("*") or (t == "i32" and n.startswith(ALIGNED))]
    return {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}


_JOBS: list[tuple[CompileCase, int]] = []  # set before the worker processes fork (jit functions do not pickle)


def compile_one(index: int) -> dict:
    """Compile job ``_JOBS[index]`` (a case and a target); return a result row (never raises)."""
    case, cc = _JOBS[index]
    row = {
        "kernel": case.kernel,
        "config": case.label,
        "target": TARGETS[cc][0],
        "heuristic": case.heuristic,
        "num_warps": case.num_warps,
        "num_stages": case.num_stages,
    }
    t0 = time.perf_counter()
    try:
        src = ASTSource(case.fn, case.signature, case.constexprs, _attrs(case))
        opts = {"num_warps": case.num_warps, "num_stages": case.num_stages}
        k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=opts)
        row.update(ok=True, shared=int(k.metadata.shared), **_resources(k.asm["cubin"]))
        row["n_regs_meta"] = getattr(k, "n_regs", None)
    except Exception as exc:
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["fits_smem"] = row.get("shared", 0) <= TARGETS[cc][1]
    row["spills"] = row.get("spill_bytes", 0) > 0
    return row


def kernel_modules() -> list[ModuleType]:
    """The modules of the registered ``triton`` implementations (one per op, in registry order, deduplicated).

    Each must define ``compile_cases(full, arch)``; the rows are listed whether or not the backend can run on
    this machine (the compile check needs no GPU)."""
    modules: dict[str, ModuleType] = {}
    for row in ops.implementations():
        if row.backend == BACKEND:
            name = get_impl(row.op, BACKEND).module
            modules.setdefault(name, sys.modules[name])
    if not modules:
        status = ops.backend_status(BACKEND)
        raise RuntimeError(f"no {BACKEND} implementation is registered ({status.reason})")
    for name, mod in modules.items():
        if not callable(getattr(mod, "compile_cases", None)):
            raise RuntimeError(f"{name} implements a {BACKEND} op but defines no compile_cases(full, arch)")
    return list(modules.values())


def cases(full: bool, cc: int) -> list[CompileCase]:
    """Every compile case of every kernel module for target ``cc`` (80 or 90)."""
    return [c for mod in kernel_modules() for c in mod.compile_cases(full, cc)]


def main(argv: list[str] | None = None) -> int:
    """Compile, print the table, write JSON; exit 1 on compile errors, unfit heuristic configs, or
    (with ``--fail-on-spill``) spills."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every config x dtype x shape, not the representative subset")
    ap.add_argument("--fail-on-spill", action="store_true", help="exit non-zero if any kernel spills registers")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    ap.add_argument("--targets", default="90,80", help="compute capabilities, comma separated")
    ap.add_argument("--only", default="", help="kernel names to compile, comma separated (default: all)")
    args = ap.parse_args(argv)

    only = set(filter(None, args.only.split(",")))
    targets = [int(cc) for cc in args.targets.split(",")]
    _JOBS[:] = [(c, cc) for cc in targets for c in cases(args.full, cc) if not only or c.kernel in only]
    t0 = time.perf_counter()
    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            rows = list(pool.map(compile_one, range(len(_JOBS)), chunksize=4))
    else:
        rows = [compile_one(i) for i in range(len(_JOBS))]
    elapsed = time.perf_counter() - t0

    print(f"triton {triton.__version__}: {len(rows)} compiles in {elapsed:.0f}s ({'full' if args.full else 'subset'})")
    print(f"{'kernel':<15} {'target':<6} {'config':<55} {'regs':>4} {'spill':>5} {'smem':>7}  note")
    errors, unfit, spills = [], [], []
    for r in rows:
        note = []
        if not r["ok"]:
            errors.append(r)
            note.append("COMPILE ERROR: " + r["error"])
        else:
            if r["spills"]:
                spills.append(r)
                note.append(f"DEFECT: spills {r['spill_bytes']} B")
            if not r["fits_smem"]:
                if r["heuristic"]:
                    unfit.append(r)
                note.append("exceeds smem" + (" (HEURISTIC CONFIG)" if r["heuristic"] else ": autotune skips it"))
        if r["heuristic"]:
            note.append("heuristic")
        regs = r.get("regs", "?")
        spill = r.get("spill_bytes", "?")
        print(
            f"{r['kernel']:<15} {r['target']:<6} {r['config']:<55} {regs!s:>4} {spill!s:>5} {r.get('shared', 0):>7}  "
            + "; ".join(note)
        )
    summary = {
        "triton": triton.__version__,
        "mode": "full" if args.full else "subset",
        "compiles": len(rows),
        "errors": len(errors),
        "spills": len(spills),
        "unfit_heuristic": len(unfit),
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, "results": rows}, indent=1))
    if spills:
        print(f"{len(spills)} kernel config(s) spill registers (defects, listed above)", file=sys.stderr)
    failed = bool(errors or unfit or (spills and args.fail_on_spill))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
