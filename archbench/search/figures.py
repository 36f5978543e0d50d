"""A study's figures, drawn by Optuna's matplotlib visualisations and written as PNG beside the study:
the Pareto front and the hypervolume history (several objectives), the optimisation history (one)."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
from optuna.trial import TrialState

from archbench.search.objectives import OBJECTIVES
from archbench.search.study import SearchSpec


def write_figures(study: optuna.Study, spec: SearchSpec, out: Path | None = None) -> list[str]:
    """The figures' paths, in ``out`` (default: the study's folder); none until two trials are complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return []
    names = spec.objectives
    out = Path(out or spec.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    if len(names) == 1:
        figures.append(("history.png", lambda: vis.plot_optimization_history(study, target_name=names[0])))
    else:
        if len(names) <= 3:
            figures.append(("pareto-front.png", lambda: vis.plot_pareto_front(study, target_names=names)))
        # the reference point: each objective's worst value seen, moved 10 % further the wrong way
        ref = []
        for i, o in enumerate(names):
            values = [t.values[i] for t in complete]
            worst = min(values) if OBJECTIVES[o].direction == "maximize" else max(values)
            margin = 0.1 * (abs(worst) or 1.0)
            ref.append(worst - margin if OBJECTIVES[o].direction == "maximize" else worst + margin)
        figures.append(("hypervolume.png", lambda: vis.plot_hypervolume_history(study, reference_point=ref)))
    paths = []
    # Optuna marks its matplotlib backend experimental, and sets a style: both kept to these figures
    with warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, draw in figures:
            ax = draw()
            path = out / name
            ax.figure.savefig(path, dpi=120, bbox_inches="tight")
            plt.close(ax.figure)
            paths.append(str(path))
    return paths
