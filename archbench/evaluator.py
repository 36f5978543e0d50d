"""What an evaluator is.

Two kinds, registered with ``@archbench.register_evaluator("name")``:

- ``kind = "model"``: ``evaluate_model(model, task) -> dict`` on one trained model (runs after
  training; results are stored in the run record, so cached runs are not re-evaluated).
- ``kind = "sweep"``: ``evaluate_sweep(runs, task) -> dict`` across the run records of a sweep
  (e.g. the alpha_ell fit over depths). When ``--set`` sweeps a knob too (``task.k=1,2,4``), a
  sweep evaluator runs once per grid point with that point's runs and task, unless it sets
  ``across_points = True`` (e.g. depth-to-solve): then it gets every run (each with its ``vary``
  dict) and ``task=None`` when there is more than one grid point. With ``needs_models = True`` it is
  called as ``evaluate_sweep(runs, task, models)`` and ``models(run)`` loads a run's trained model.
  ``requires`` names evaluators whose per-run results it reads (they run first).

Results are plain JSON-ready numbers. ``plot(result, runs, path)`` may draw a PNG figure, and
``plot_points(knobs, results, path)`` one across the grid points when one or two knobs are swept.
Knobs are ``__init__`` keyword arguments, set with ``--set NAME.knob=value``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ClassVar

from archbench.records import RunRecord


class Evaluator:
    kind: ClassVar[str] = "model"
    across_points: ClassVar[bool] = False
    # evaluators whose per-run results this one reads (``archbench eval`` runs them too, first)
    requires: ClassVar[tuple[str, ...]] = ()
    # a sweep evaluator that compares trained models gets ``models(run) -> model | None`` as a third argument
    needs_models: ClassVar[bool] = False

    def report(self, fraction: float) -> None:
        """Tell a progress display how far a long evaluation has got (0..1); a no-op unless one listens."""
        listener = getattr(self, "on_progress", None)
        if listener is not None:
            listener(fraction)

    @classmethod
    def check_task(cls, task) -> None:
        """Raise ``UsageError`` before any training if this evaluator cannot serve ``task`` (a registry entry)."""

    def evaluate_model(self, model, task) -> dict:
        raise NotImplementedError

    def evaluate_sweep(self, runs: list[RunRecord], task) -> dict:
        raise NotImplementedError

    def plot(self, result: dict, runs: list[RunRecord], path: Path) -> bool:
        """Draw this evaluator's figure to ``path``; return False if it has none."""
        return False

    def plot_points(self, knobs: list[str], points: list[dict], path: Path) -> bool:
        """A per-point sweep evaluator's figure across the grid when one or two knobs are swept (``points``:
        its per-point results, each with its ``vary``); return False if it has none."""
        return False


def point_label(vary: dict) -> str:
    """``{"task.k": 2, "task.pairs": 8}`` -> ``"k=2, pairs=8"`` (the grid point of a run)."""
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in vary.items())


@contextlib.contextmanager
def figure(path: Path, xlabel: str, ylabel: str, legend_size: float | None = None):
    """Axes for an evaluator's figure; labelled, gridded and saved to ``path`` as a PNG on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=legend_size)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


@contextlib.contextmanager
def panels(path: Path, rows: int, cols: int, size: tuple[float, float], title: str | None = None):
    """``(fig, axes)`` for a multi-panel figure, saved to ``path`` as a PNG on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(rows, cols, figsize=size, dpi=110)
    try:
        yield fig, ax
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
