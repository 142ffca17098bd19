"""pytest plugin: run transformers' own GPT-2 tests with every GPT-2 model they build patched by gpt2fast.

Loaded by ``run.py`` (``-p gpt2fast_hf_plugin``); ``--gpt2fast-backend`` selects the run:

* ``none``: nothing is patched (the baseline run);
* ``reference``: ``gpt2fast.auto_patch(backend="reference")``;
* ``triton``: ``gpt2fast.auto_patch(backend="auto")`` with the Triton backend (under ``TRITON_INTERPRET=1``)
  allowed to serve CPU tensors, so each op runs on Triton where its kernels take the input and falls through to
  ``reference`` where they do not (a head dim of 16, a gradient the kernels have no backward for).

``--gpt2fast-stats PATH`` writes, as JSON, every (site, route) count of the run, the calls that reached each
(op, backend) implementation, and, per test, the gpt2fast routes it reached, so a report can say how much of the
suite went through the kernels, and on which backend.
"""

from __future__ import annotations

import json
import os

import pytest

_state: dict = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    """The plugin's options."""
    group = parser.getgroup("gpt2fast")
    group.addoption("--gpt2fast-backend", default="none", choices=("none", "reference", "triton"))
    group.addoption("--gpt2fast-stats", default=None, help="write the call counts as JSON here")


def pytest_configure(config: pytest.Config) -> None:
    """Install the auto-patch hook before any test module builds a model."""
    backend = config.getoption("--gpt2fast-backend")
    _state.update(backend=backend, per_test={})
    if backend == "none":
        return
    if backend == "triton":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import gpt2fast
    from gpt2fast import ops

    if backend == "triton":
        from gpt2fast.ops import _registry

        ops.backend_names()  # import the built-in backends
        triton = _registry._backends["triton"]  # let "auto" pick Triton for CPU tensors too (interpreted)
        ops.register_backend(
            "triton", priority=triton.priority, is_available=triton.is_available, describe=triton.describe
        )
        status = ops.backend_status("triton", "cpu")
        if not status.available:
            raise pytest.UsageError(f"triton cannot run here: {status.reason}")
    _state["hook"] = gpt2fast.auto_patch(backend="reference" if backend == "reference" else "auto")
    from gpt2fast.testing.conformance import count_dispatches

    _state["dispatch_cm"] = count_dispatches()  # calls reaching each (op, backend) implementation
    _state["dispatches"] = _state["dispatch_cm"].__enter__()


def _routes() -> dict[tuple[str, str], int]:
    from gpt2fast import hf_patch_stats

    return dict(hf_patch_stats().calls)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """Record the gpt2fast routes each test reached."""
    if _state.get("backend", "none") == "none":
        yield
        return
    before = _routes()
    yield
    after = _routes()
    reached = {f"{s}:{r}": n - before.get((s, r), 0) for (s, r), n in after.items() if n != before.get((s, r), 0)}
    _state["per_test"][item.nodeid] = reached


def pytest_unconfigure(config: pytest.Config) -> None:
    """Write the counts and remove the hook."""
    path = config.getoption("--gpt2fast-stats")
    if _state.get("backend", "none") != "none" and path:
        totals = {f"{s}:{r}": n for (s, r), n in sorted(_routes().items())}
        by_impl = {f"{op}:{be}": n for (op, be), n in sorted(_state["dispatches"].items())}
        report = {"backend": _state["backend"], "totals": totals, "implementations": by_impl}
        with open(path, "w") as f:
            json.dump({**report, "per_test": _state["per_test"]}, f, indent=1)
    if "dispatch_cm" in _state:
        _state.pop("dispatch_cm").__exit__(None, None, None)
    hook = _state.pop("hook", None)
    if hook is not None:
        hook.remove()
