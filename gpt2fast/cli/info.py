"""``gpt2fast info``: versions, devices, every registered backend's availability, and which backend implements
which op."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import shutil
import subprocess

import torch

from gpt2fast.cli._common import Subparsers, consoles, resolve_device


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        return f"not available ({type(exc).__name__}: {exc})"
    return getattr(mod, "__version__", "installed")


def _nvcc_version() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "not on PATH"
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{nvcc} (cannot run: {exc})"
    release = next((line.split("release")[-1].strip() for line in text.splitlines() if "release" in line), "?")
    return f"{release} ({nvcc})"


def cuda_extension_status() -> tuple[bool, str]:
    """Whether the compiled CUDA extension ``gpt2fast._C`` is built and importable, and why (not)."""
    if importlib.util.find_spec("gpt2fast._C") is None:
        return False, "not built (pip install -e . with nvcc on PATH builds it)"
    try:
        mod = importlib.import_module("gpt2fast._C")
    except Exception as exc:
        return False, f"built but fails to import: {exc}"
    return True, f"built ({getattr(mod, '__file__', '?')})"


def backend_rows(device: torch.device | str) -> list[tuple[str, bool, str]]:
    """``(name, available, reason)`` for every registered backend on ``device`` (``ops.available_backends``);
    a crashing check is reported as a row, not raised."""
    from gpt2fast.ops import available_backends

    try:
        return [(s.name, s.available, s.reason) for s in available_backends(device)]
    except Exception as exc:
        return [("?", False, f"availability check failed: {type(exc).__name__}: {exc}")]


def run(args: argparse.Namespace) -> int:
    """Versions, devices, which backends can run where (and why not), and which backend implements which op."""
    from rich.table import Table

    import gpt2fast
    from gpt2fast.ops import backend_names, implementations

    out, _ = consoles()
    env = Table(title="environment", show_header=False)
    env.add_column(style="bold")
    env.add_column()
    ext_ok, ext_reason = cuda_extension_status()
    for key, value in [
        ("gpt2fast", gpt2fast.__version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA", torch.version.cuda or "none (CPU build)"),
        ("triton", _version("triton")),
        ("transformers", _version("transformers")),
        ("tokenizers", _version("tokenizers")),
        ("tiktoken", _version("tiktoken")),
        ("nvcc", _nvcc_version()),
        ("CUDA extension gpt2fast._C", ("[green]" if ext_ok else "[yellow]") + ext_reason),
    ]:
        env.add_row(key, value)
    out.print(env)

    devices = Table(title="devices")
    for col in ("device", "name", "capability", "memory"):
        devices.add_column(col)
    devices.add_row("cpu", platform.processor() or platform.machine(), "-", "-")
    n_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(n_cuda):
        prop = torch.cuda.get_device_properties(i)
        devices.add_row(f"cuda:{i}", prop.name, f"sm_{prop.major}{prop.minor}", f"{prop.total_memory / 2**30:.1f} GiB")
    if not n_cuda:
        devices.add_row("cuda", "[yellow]no CUDA device visible", "-", "-")
    out.print(devices)

    table = Table(title="backends")
    for col in ("device", "backend", "available", "why"):
        table.add_column(col)
    for device in ("cpu", "cuda"):
        for name, ok, reason in backend_rows(device):
            table.add_row(device, name, "[green]yes" if ok else "[red]no", reason)
    out.print(table)

    device = resolve_device(None)
    names = backend_names()
    impl = {(r.op, r.backend): r.reason for r in implementations(device)}
    grid = Table(title=f"implementations (on {device}: yes = runs here, no = implemented, unavailable here)")
    grid.add_column("op")
    for name in names:
        grid.add_column(name)
    for op in dict.fromkeys(r[0] for r in impl):
        cells = [
            "–" if (op, name) not in impl else "[green]yes" if impl[(op, name)] is None else "[yellow]no"
            for name in names
        ]
        grid.add_row(op, *cells)
    out.print(grid)
    return 0


def add_parser(sub: Subparsers) -> None:
    """Add ``info`` to the ``gpt2fast`` subparsers."""
    p = sub.add_parser("info", help="versions, devices and backend availability", description=run.__doc__)
    p.set_defaults(func=run)
