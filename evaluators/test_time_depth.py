"""test-time-depth: a trained recurrent model evaluated at other iteration counts, without retraining.

Recurrent-depth models are meant to improve when given more iterations at test time than training
used (Geiping et al. 2025). For every run of a recurrent block this evaluates the held-out loss at
each r in ``recurrence`` and reports it with the effective depth it amounts to.
"""

from __future__ import annotations

from pathlib import Path

import archbench
from archbench.errors import UsageError
from archbench.evaluator import Evaluator, figure


@archbench.register_evaluator("test-time-depth", family="recurrent")
class TestTimeDepth(Evaluator):
    """Held-out loss of a trained recurrent block at other iteration counts r (test-time depth)."""

    kind = "model"

    def __init__(self, recurrence: tuple[int, ...] = (1, 2, 4, 8, 16, 32), batch_size: int = 256):
        self.recurrence = sorted(set(recurrence))
        if not self.recurrence or self.recurrence[0] < 1:
            raise UsageError(f"test-time-depth.recurrence={','.join(map(str, recurrence))}: "
                             f"iteration counts must be positive, e.g. 1,2,4,8")
        self.batch_size = batch_size

    def evaluate_model(self, model, task) -> dict:
        body = model.body
        if not hasattr(body, "recurrence"):
            return {"note": "the block has no recurrence to vary"}
        trained = body.recurrence
        by_r = {}
        try:
            for r in self.recurrence:
                body.recurrence = r
                by_r[str(r)] = {"effective_depth": model.effective_depth, **task.evaluate(model, self.batch_size)}
        finally:
            body.recurrence = trained
        return {"trained_recurrence": trained, "by_recurrence": by_r}

    def plot(self, result, runs, path: Path) -> bool:
        curves = [(r, result["per_run"].get(r.key) or {}) for r in runs]
        curves = [(r, c) for r, c in curves if "by_recurrence" in c]
        if not curves:
            return False
        with figure(path, "iterations r at evaluation", "test loss", legend_size=7) as ax:
            for i, (run, c) in enumerate(curves):
                rs = [int(k) for k in c["by_recurrence"]]
                losses = [v["loss"] for v in c["by_recurrence"].values()]
                ax.loglog(rs, losses, "o-", color=f"C{i}", label=f"trained at r = {c['trained_recurrence']:g} "
                                                                 f"(depth {run.depth}, seed {run.seed})")
                ax.axvline(c["trained_recurrence"], color=f"C{i}", ls=":", alpha=0.6)
        return True
