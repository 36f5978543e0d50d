"""error-by-k: held-out error at every hop count k, per depth, with intervals over seeds.

For tasks that score each difficulty inside one run (``hop-induction`` reports ``error_k0``,
``error_k1``, ... in its held-out metrics), the table Sanford et al. publish: error against k, one
row per depth, the mean over seeds with a normal 95 % interval (± 1.96 standard errors; none for one
seed), and for each depth the largest k it solves (every k up to it at error <= ``solved_at``). A
model that composes by pointer doubling solves k ≈ 2^(L−2) at depth L: the solved k grows
exponentially with depth, where one hop per layer would grow linearly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import archbench
from archbench.errors import UsageError
from archbench.evaluator import Evaluator, figure

PREFIX = "error_k"


def errors_of(run) -> dict[int, float]:
    """``{k: error}`` from a run's held-out metrics."""
    return {int(name[len(PREFIX):]): float(v) for name, v in (run.eval or {}).items()
            if name.startswith(PREFIX) and name[len(PREFIX):].isdigit()}


@archbench.register_evaluator("error-by-k", family="composition")
class ErrorByK(Evaluator):
    """Held-out error at every hop count k per depth, mean and 95 % interval over seeds (hop-induction)."""

    kind = "sweep"

    def __init__(self, *, solved_at: float = 0.01):
        if not 0 <= solved_at < 1:
            raise UsageError(f"error-by-k.solved_at={solved_at}: need an error rate in [0, 1)")
        self.solved_at = solved_at

    @classmethod
    def check_task(cls, task):
        if not getattr(task.obj, "scores_each_k", False):
            raise UsageError(f"error-by-k: task {task.name!r} does not score each hop count in its held-out "
                             f"metrics; use hop-induction, or depth-to-solve with --set task.k=1,2,4")

    def evaluate_sweep(self, runs, task):
        ok = [r for r in runs if r.ok and errors_of(r)]
        if not ok:
            return {"per_depth": [], "note": "no finished run reported errors per k"}
        ks = sorted(set.intersection(*(set(errors_of(r)) for r in ok)))
        per_depth = []
        for d in sorted({r.effective_depth for r in ok}):
            at = np.array([[errors_of(r)[k] for k in ks] for r in ok if r.effective_depth == d])
            mean = at.mean(0)
            half = 1.96 * at.std(0, ddof=1) / np.sqrt(len(at)) if len(at) > 1 else None
            solved = -1
            for k, e in zip(ks, mean):
                if e > self.solved_at:
                    break
                solved = k
            per_depth.append({"depth": d, "seeds": len(at), "error": mean.tolist(),
                              "ci95": None if half is None else [(mean - half).tolist(), (mean + half).tolist()],
                              "largest_k_solved": solved if solved >= 0 else None})
        return {"k": ks, "solved_at": self.solved_at, "per_depth": per_depth}

    def plot(self, result, runs, path: Path) -> bool:
        if not result.get("per_depth"):
            return False
        with figure(path, "hops k", "held-out error (fraction of positions)") as ax:
            for row in result["per_depth"]:
                err = None
                if row["ci95"]:
                    lo, hi = np.array(row["ci95"])
                    err = [np.array(row["error"]) - lo, hi - np.array(row["error"])]
                ax.errorbar(result["k"], row["error"], yerr=err, marker="o", ms=3, capsize=2,
                            label=f"depth {row['depth']} ({row['seeds']} seed{'s' * (row['seeds'] > 1)})")
            ax.set_ylim(-0.02, 1.0)
        return True
