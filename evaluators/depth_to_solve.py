"""depth-to-solve: the smallest effective depth that solves each difficulty of a task.

From one sweep over depths and a difficulty knob (``--set task.k=1,2,4,8``), for every grid
point: the smallest effective depth at which at least ``min_fraction`` of the seeds solve the
task (the task's own criterion, e.g. held-out accuracy >= 99 %), and each seed's own smallest
solving depth (the figure's bars span them). A block that composes needs
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
            by_seed = {r.seed: None for r in rs}
            for r in sorted(rs, key=lambda r: r.effective_depth):
                if r.solved and by_seed[r.seed] is None:
                    by_seed[r.seed] = r.effective_depth
            rows.append({"vary": vary, "label": point_label(vary) or "as configured", "depth_to_solve": first,
                         "depth_to_solve_by_seed": {str(s): d for s, d in sorted(by_seed.items())},
                         "max_depth_tried": per_depth[-1]["depth"],
                         "unsolved_above": [p["depth"] for p in per_depth
                                            if first is not None and p["depth"] > first and p["depth"] not in solved],
                         "per_depth": per_depth})
        out = {"min_fraction": self.min_fraction, "difficulties": rows}
        knobs = sorted({k for row in rows for k in row["vary"]})
        numeric = [k for k in knobs if all(isinstance(row["vary"].get(k), (int, float)) for row in rows)]
        if len(knobs) == 1:
            out["difficulty_knob"] = knob = knobs[0]
            slope = _slope([(row["vary"][knob], row["depth_to_solve"]) for row in rows])
            if slope is not None:
                out["layers_per_step"] = slope
        elif len(knobs) == 2 and len(numeric) >= 1:
            # e.g. task.seq_len against task.group: depth to solve against the numeric knob, one series per value
            # of the other (the first numeric knob is the difficulty when both are)
            knob = numeric[0]
            series = next(k for k in knobs if k != knob)
            out["difficulty_knob"], out["series_knob"] = knob, series
            out["layers_per_step_by_series"] = {
                str(v): _slope([(row["vary"][knob], row["depth_to_solve"]) for row in rows
                                if row["vary"][series] == v])
                for v in dict.fromkeys(row["vary"][series] for row in rows)}
        return out

    def plot(self, result, runs, path: Path) -> bool:
        rows = result["difficulties"]
        if not rows:
            return False
        if result.get("series_knob"):
            return self._plot_series(result, path)
        knob = result.get("difficulty_knob")
        numeric = knob is not None and all(isinstance(r["vary"][knob], (int, float)) for r in rows)
        xs = [r["vary"][knob] if numeric else i for i, r in enumerate(rows)]
        top = max(r["max_depth_tried"] for r in rows)
        with figure(path, knob.split(".", 1)[1] if numeric else "difficulty", "effective depth to solve") as ax:
            solved = [(x, r) for x, r in zip(xs, rows) if r["depth_to_solve"] is not None]
            if solved:
                _line(ax, [x for x, _ in solved], [r for _, r in solved], "C0", "smallest depth that solves")
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
            _whole_numbers(ax, x=numeric)
        return True

    def _plot_series(self, result, path: Path) -> bool:
        rows, knob, series = result["difficulties"], result["difficulty_knob"], result["series_knob"]
        top = max(r["max_depth_tried"] for r in rows)
        with figure(path, knob.split(".", 1)[1], "effective depth to solve") as ax:
            for i, value in enumerate(dict.fromkeys(r["vary"][series] for r in rows)):
                at = sorted(((r["vary"][knob], r) for r in rows if r["vary"][series] == value), key=lambda p: p[0])
                name = f"{series.split('.', 1)[1]}={value}"
                solved = [(x, r) for x, r in at if r["depth_to_solve"] is not None]
                if solved:
                    _line(ax, [x for x, _ in solved], [r for _, r in solved], f"C{i}", name)
                unsolved = [x for x, r in at if r["depth_to_solve"] is None]
                if unsolved:
                    ax.plot(unsolved, [top * (1.1 + 0.05 * i)] * len(unsolved), "^", color=f"C{i}",
                            label=f"{name}: not solved by depth {top}")
            ax.set_ylim(0, top * 1.4)
            _whole_numbers(ax)
        return True


def _whole_numbers(ax, x: bool = True) -> None:
    """Depths (and the usual difficulty knobs: lengths, hop counts) are whole numbers; so are their ticks."""
    from matplotlib.ticker import MaxNLocator

    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _line(ax, xs, rows, color, label) -> None:
    """Depth to solve against the difficulty, with a bar over the seeds' own depths where they differ (a seed
    that solved at no depth tried is left out of its bar)."""
    ys = np.array([r["depth_to_solve"] for r in rows], float)
    seeds = [[d for d in r.get("depth_to_solve_by_seed", {}).values() if d is not None] or [y]
             for r, y in zip(rows, ys)]
    err = np.array([[y - min(s) for y, s in zip(ys, seeds)], [max(s) - y for y, s in zip(ys, seeds)]])
    ax.errorbar(xs, ys, yerr=err if err.any() else None, fmt="o-", color=color, capsize=3, label=label)


def _slope(points) -> float | None:
    """Least-squares layers per step of difficulty over the solved points (None: fewer than two)."""
    pts = [(x, d) for x, d in points if d is not None and isinstance(x, (int, float))]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    return float(np.polyfit(*np.array(pts, float).T, 1)[0])
