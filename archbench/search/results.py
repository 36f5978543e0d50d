"""What a study found, as plain data: a row per trial, the best trials (or the Pareto front), the
trials that beat the baseline, and the ``archbench eval`` command that reproduces a trial."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from archbench.registry import BLOCKS
from archbench.search.failures import FAILURE
from archbench.search.objectives import OBJECTIVES
from archbench.search.study import SearchSpec, counted


def trial_row(t, objectives: list[str]) -> dict:
    """A trial as a table row: its block, the knobs that differ from the block's defaults, width,
    parameters, objective values, failure reason, training time and the eval that reproduces it."""
    ev = t.user_attrs.get("eval", {})
    block = t.params.get("block")
    defaults = {k: knob.default for k, knob in BLOCKS.get(block).knobs.items()} if block in BLOCKS else {}
    return {"number": t.number, "state": t.state.name, "block": block,
            "knobs": {k.split(".", 1)[1]: v for k, v in t.params.items()
                      if k != "block" and defaults.get(k.split(".", 1)[1], object()) != v},
            "width": ev.get("sets", {}).get("model", {}).get("width"),
            "params": max((r["params"] for r in t.user_attrs.get("runs", [])), default=None),
            "values": dict(zip(objectives, t.values)) if t.values else None,
            "alpha_ci95": t.user_attrs.get("alpha_ci95"), "failure": t.user_attrs.get(FAILURE),
            "baseline": bool(t.user_attrs.get("baseline")),
            "wall_s": sum(r["wall_s"] for r in t.user_attrs.get("runs", [])),
            "eval": ev, "evals": t.user_attrs.get("evals"), "result": t.user_attrs.get("result")}


def summary(study: optuna.Study, spec: SearchSpec) -> dict:
    """The study at a glance: trials by state, the best trials (the Pareto front when there are several
    objectives), the baseline and the trials that beat its α_ℓ (at no worse loss, when loss is one)."""
    trials = study.get_trials(deepcopy=False)
    objectives = spec.objectives
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(objectives) > 1:
        best = _first_of_each(sorted(study.best_trials, key=lambda t: t.number) if complete else [])
    else:
        sign = -1 if OBJECTIVES[objectives[0]].direction == "maximize" else 1
        best = _first_of_each(sorted(complete, key=lambda t: sign * t.values[0]))[:5]
    base = next((t for t in complete if t.user_attrs.get("baseline")), None)
    beats = []
    if base is not None and "alpha" in objectives:
        ia = objectives.index("alpha")
        il = objectives.index("loss") if "loss" in objectives else None
        beats = [t.number for t in complete if t is not base and t.values[ia] > base.values[ia]
                 and (il is None or t.values[il] <= base.values[il])]
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    return {"study": spec.study_name, "storage": spec.storage_url, "objectives": objectives,
            "directions": [OBJECTIVES[o].direction for o in objectives], "trials": len(trials),
            "counted": counted(study), "states": {k: v for k, v in states.items() if v},
            # TPE may draw a configuration again (its runs are cached, so it costs nothing): how many differ
            "distinct": len({tuple(sorted(t.params.items())) for t in complete}),
            "best": [trial_row(t, objectives) for t in best],
            "baseline": trial_row(base, objectives) if base else None, "beats_baseline": beats,
            "wall_s": sum(trial_row(t, objectives)["wall_s"] for t in trials)}


def _first_of_each(trials: list) -> list:
    """The first trial of each configuration (TPE may draw one again; its runs were cached)."""
    seen, out = set(), []
    for t in trials:
        if (key := tuple(sorted(t.params.items()))) not in seen:
            seen.add(key)
            out.append(t)
    return out


def eval_command(row: dict, spec: SearchSpec) -> str:
    """The ``archbench eval`` command(s) that reproduce a trial's sweep(s), one per task its objectives need."""
    evals = row.get("evals") or [{**row["eval"], "task": spec.task, "preset": spec.preset}]
    commands = []
    for ev in evals:
        sets = " ".join(f"--set {s}.{k}={v}" for s, kv in ev.get("sets", {}).items() for k, v in kv.items())
        commands.append(f"archbench eval --block {ev.get('block')} --task {ev['task']} --preset {ev['preset']} "
                        f"{sets}".strip())
    return " && ".join(commands)
