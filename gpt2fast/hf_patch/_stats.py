"""Where every call of a patched transformers GPT-2 went: a gpt2fast op, or the model's own code and why."""

from __future__ import annotations

import torch

#: Route prefix of a call that ran a gpt2fast op (``"gpt2fast.attention"``); every other route is a fallback.
FAST = "gpt2fast."
#: Route prefix of a call that ran the model's own transformers code (``"fallback: output_attentions=True"``).
FALLBACK = "fallback: "
#: The patched call sites, in model order.
SITES = ("layer_norm", "mlp", "attention", "loss")


class HFPatchStats:
    """Counts of the calls a patched model made, by ``(site, route)``.

    ``site`` is one of :data:`SITES`; ``route`` is ``"gpt2fast.<op>"`` when a gpt2fast op ran, or
    ``"fallback: <reason>"`` when the model's own (configured) transformers code ran.  One object is shared by
    every patched module of a model; ``copy.deepcopy``/``torch.load`` give the copy its own.  Calls traced into a
    ``torch.compile`` graph are not counted: reading a count there would make the graph guard on it and recompile
    on every call (the eager parts of a compiled model, e.g. around a graph break, are counted).
    """

    def __init__(self) -> None:
        self.calls: dict[tuple[str, str], int] = {}

    def record(self, site: str, route: str) -> None:
        """Count one call of ``site`` that took ``route`` (here and in the process-wide totals)."""
        if torch.compiler.is_compiling():
            return
        key = (site, route)
        self.calls[key] = self.calls.get(key, 0) + 1
        if self is not TOTALS:
            TOTALS.calls[key] = TOTALS.calls.get(key, 0) + 1

    def fast(self, site: str | None = None) -> int:
        """Calls (of ``site``, or of every site) that ran a gpt2fast op."""
        return sum(n for (s, r), n in self.calls.items() if r.startswith(FAST) and site in (None, s))

    def fallback(self, site: str | None = None) -> int:
        """Calls (of ``site``, or of every site) that ran transformers' own code."""
        return sum(n for (s, r), n in self.calls.items() if not r.startswith(FAST) and site in (None, s))

    def routes(self, site: str) -> dict[str, int]:
        """``{route: calls}`` of one site."""
        return {r: n for (s, r), n in self.calls.items() if s == site}

    def reasons(self) -> dict[str, int]:
        """``{fallback reason: calls}`` over every site."""
        out: dict[str, int] = {}
        for (_, r), n in self.calls.items():
            if not r.startswith(FAST):
                reason = r.removeprefix(FALLBACK)
                out[reason] = out.get(reason, 0) + n
        return out

    def reset(self) -> None:
        """Forget every count."""
        self.calls.clear()

    def summary(self) -> str:
        """One line per (site, route), most frequent first."""
        rows = sorted(self.calls.items(), key=lambda kv: (SITES.index(kv[0][0]) if kv[0][0] in SITES else 99, -kv[1]))
        return "\n".join(f"{site:<10} {route:<60} {n}" for (site, route), n in rows) or "(no calls)"

    def __repr__(self) -> str:
        return f"HFPatchStats(fast={self.fast()}, fallback={self.fallback()})"


#: Every patched model's calls in this process, summed (``gpt2fast.hf_patch_stats()`` without a model).
TOTALS = HFPatchStats()
