"""depth-to-solve: the smallest effective depth that solves each difficulty of a task.

From one sweep over depths and a difficulty knob (``--set task.k=1,2,4,8``), for every grid
point: the smallest effective depth at which at least ``min_fraction`` of the seeds solve the
task (the task's own criterion, e.g. held-out accuracy >= 99 %). A block that composes needs
depth growing slowly with difficulty, about one layer per step or fewer; a block in the
ensemble-averaging regime needs far more, or never gets there. Where the difficulty is one
numeric knob, ``layers_per_step`` is the least-squares slope of depth-to-solve against it over
the solved points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import archbench
from archbench.errors import UsageError
from archbench.evaluator import Evaluator, figure, point_label


@archbench.register_evaluator("depth-to-solve", family="composition")
class DepthToSolve(Evaluator):
    """Smallest effective depth that solves each difficulty (sweep a task knob with --set task.k=1,2,4)."""

    kind = "sweep"
    across_points = True

    def __init__(self, *, min_fraction: float = 0.5):
        if not 0 < min_fraction <= 1:
            raise UsageError(f"depth-to-solve.min_fraction={min_fraction}: need a fraction of seeds in (0, 1]")
        self.min_fraction = min_fraction

    @classmethod
    def check_task(cls, task):
        if task.obj.solve_metric is None:
            raise UsageError(f"depth-to-solve: task {task.name!r} has no notion of solved; use a task that has "
                             f"(k-hop, word-problem, variable-binding, modular-chain, cfg-language) "
                             f"or other evaluators (--evaluators alpha-ell)")

    def evaluate_sweep(self, runs, task):
        groups: list[tuple[dict, list]] = []
        for r in runs:
            if not groups or groups[-1][0] != r.vary:
                groups.append((r.vary, []))
            groups[-1][1].append(r)
        rows = []
        for vary, rs in groups:
            per_depth = []
            for d in sorted({r.effective_depth for r in rs}):
                at = [r for r in rs if r.effective_depth == d]
                frac = float(np.mean([bool(r.solved) for r in at]))
                per_depth.append({"depth": d, "solved_fraction": frac,
                                  "loss": float(np.mean([np.nan if r.final_loss is None else r.final_loss for r in at]))})
            solved = [p["depth"] for p in per_depth if p["solved_fraction"] >= self.min_fraction]
            first = min(solved) if solved else None
            rows.append({"vary": vary, "label": point_label(vary) or "as configured", "depth_to_solve": first,
                         "max_depth_tried": per_depth[-1]["depth"],
                         "unsolved_above": [p["depth"] for p in per_depth
                                            if first is not None and p["depth"] > first and p["depth"] not in solved],
                         "per_depth": per_depth})
        out = {"min_fraction": self.min_fraction, "difficulties": rows}
        knobs = {k for row in rows for k in row["vary"]}
        if len(knobs) == 1:
            (knob,) = knobs
            pts = [(row["vary"][knob], row["depth_to_solve"]) for row in rows if row["depth_to_solve"] is not None]
            out["difficulty_knob"] = knob
            if len(pts) >= 2 and all(isinstance(x, (int, float)) for x, _ in pts) and len({x for x, _ in pts}) > 1:
                out["layers_per_step"] = float(np.polyfit(*np.array(pts, float).T, 1)[0])
        return out

    def plot(self, result, runs, path: Path) -> bool:
        rows = result["difficulties"]
        if not rows:
            return False
        knob = result.get("difficulty_knob")
        numeric = knob is not None and all(isinstance(r["vary"][knob], (int, float)) for r in rows)
        xs = [r["vary"][knob] if numeric else i for i, r in enumerate(rows)]
        top = max(r["max_depth_tried"] for r in rows)
        with figure(path, knob.split(".", 1)[1] if numeric else "difficulty", "effective depth to solve") as ax:
            solved = [(x, r["depth_to_solve"]) for x, r in zip(xs, rows) if r["depth_to_solve"] is not None]
            if solved:
                ax.plot(*zip(*solved), "o-", label="smallest depth that solves")
            unsolved = [x for x, r in zip(xs, rows) if r["depth_to_solve"] is None]
            if unsolved:
                ax.plot(unsolved, [top * 1.15] * len(unsolved), "^", color="C3",
                        label=f"not solved by depth {top}")
            if numeric:
                lo, hi = min(xs), max(xs)
                ax.plot([lo, hi], [lo, hi], ":", color="gray", label="one layer per step")
            else:
                ax.set_xticks(xs, [r["label"] for r in rows], rotation=20)
            ax.set_ylim(0, top * 1.3)
        return True
