"""Confirmation: the best trials (the Pareto front) and the baseline re-run at the preset's full budget
with several seeds, each objective compared with the baseline's by ``archbench compare``'s paired
bootstrap interval. A search finds candidates cheaply; only a difference whose interval excludes 0 here
counts as a win. Each trial also meets its *control*, the baseline block with the trial's settings that
block has too (activation, gate, norm, MLP ratio, ...), sized to the same budget: a trial that beats the
baseline but not its control won through those settings, not through its block."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from archbench.compare import compare, compare_metric
from archbench.config import EvalSpec
from archbench.errors import UsageError
from archbench.records import atomic_write
from archbench.search.objectives import OBJECTIVES, error_over_k
from archbench.search.study import SearchSpec
from archbench.search.workers import stop_with, threads_each

# objectives a replicate interval exists for: (compare's metric, or None for α_ℓ)
COMPARED = {"alpha": None, "loss": "loss", "lm-loss": "loss", "compose": error_over_k}


def confirm(spec: SearchSpec, summary: dict, seeds: int, console=None, controls: bool = True) -> dict:
    """Re-run the summary's best trials, their controls and its baseline with ``seeds`` seeds and no
    ``train.steps`` override (the preset's budget); returns, and writes beside the study, each trial's
    objectives against the baseline's and against its control's, with the interval of each difference
    and a verdict (``controls=False``: against the baseline alone)."""
    results: dict[tuple[int, str], dict[str, str]] = {}
    evals = confirmation_evals(spec, summary, seeds, controls)
    for (label, ev), result in zip(evals, _run_sweeps(spec, evals, console)):
        results.setdefault(label, {})[ev.task] = result
    base = results[(summary["baseline"]["number"], "trial")]
    out = {"study": spec.study_name, "seeds": seeds, "baseline": summary["baseline"]["number"],
           "baseline_results": base, "trials": []}
    for row in _front(summary):
        mine = results[(row["number"], "trial")]
        entry = {"number": row["number"], "block": row["block"], "knobs": row["knobs"], "results": mine,
                 **_versus(spec, mine, base, "the baseline")}
        if (row["number"], "control") in results:
            ctl = results[(row["number"], "control")]
            entry["control"] = {"results": ctl, **_versus(spec, mine, ctl, "its control"),
                                "knobs": _control_sets(spec, summary, row)["block"]}
        out["trials"].append(entry)
    path = spec.study_dir / "confirmation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(out, indent=1).encode()))
    out["file"] = str(path)
    return out


def _front(summary: dict) -> list[dict]:
    return [r for r in summary["best"] if r["number"] != summary["baseline"]["number"]]


def _versus(spec: SearchSpec, mine: dict, other: dict, name: str) -> dict:
    """Each objective of ``mine`` minus ``other``'s; beside compose, the task's headline (hop-induction: the
    error at the hardest k); and whether that is a win: better on one objective at least, beyond the
    noise, and worse on none."""
    against = {o: _against(o, spec, mine, other, name) for o in spec.objectives}
    also = {f"{o}@{m}": _against(o, spec, mine, other, name, metric=m) for o in spec.objectives if o == "compose"
            for m in [_headline(OBJECTIVES[o].task, other[OBJECTIVES[o].task])]}
    verdicts = [v["verdict"] for v in against.values()]
    return {"objectives": against, "also": also,
            "win": any(v.startswith("better") for v in verdicts) and not any(v.startswith("worse") for v in verdicts)}


def confirmation_evals(spec: SearchSpec, summary: dict, seeds: int,
                       controls: bool = True) -> list[tuple[tuple[int, str], EvalSpec]]:
    """((trial number, "trial" or "control"), eval) of every sweep a confirmation runs: the baseline's first,
    then each best trial's, then each trial's control, one per task, with ``seeds`` seeds at the preset's
    steps."""
    if seeds < 3:
        raise UsageError(f"--confirm {seeds}: a confirmation needs at least 3 seeds for an interval")
    base = summary["baseline"]
    if base is None:
        raise UsageError("--confirm needs the study's baseline trial (run without --baseline none)")
    out = [((row["number"], "trial"), _full_budget(spec, ev, seeds))
           for row in [base] + _front(summary) for ev in _evals(spec, row)]
    runner = None  # sizes the controls to the budget, measured once
    for row in _front(summary) if controls else []:
        if (sets := _control_sets(spec, summary, row)) is not None:
            from archbench.search.trial import TrialRunner

            runner = runner or TrialRunner(spec, space=None)
            out += [((row["number"], "control"), _full_budget(spec, {"block": base["block"], "task": sw.task,
                                                                      "preset": spec.preset, "sets": planned}, seeds))
                    for sw, planned, _, _ in runner.plan(base["block"], sets)]
    return out


def _evals(spec: SearchSpec, row: dict) -> list[dict]:
    return row.get("evals") or [{**row["eval"], "task": spec.task, "preset": spec.preset}]


def _full_budget(spec: SearchSpec, ev: dict, seeds: int) -> EvalSpec:
    sets = {s: {k: v for k, v in kv.items() if (s, k) != ("train", "steps")} for s, kv in ev["sets"].items()}
    return EvalSpec(block=ev["block"], task=ev["task"], preset=ev["preset"], seeds=seeds, sets=sets,
                    depths=spec.depths if ev["task"] == spec.task else None, device=spec.device,
                    runs_dir=spec.runs_dir, plots=False, ray=spec.ray)


def _control_sets(spec: SearchSpec, summary: dict, row: dict) -> dict | None:
    """The trial's settings the baseline block can take: its block knobs the baseline declares too, and
    every other section but the fitted width. None where that is the baseline itself (nothing to
    separate) or the trial is of the baseline's block."""
    from archbench.registry import BLOCKS

    base = summary["baseline"]
    if row["block"] == base["block"]:
        return None
    declared = BLOCKS.get(base["block"]).knobs
    # task.* settings are the study's own task's (--set), which planning the sweeps adds back to that task alone
    sets = {section: {k: v for k, v in values.items() if section != "model" or k != "width"}
            for section, values in _evals(spec, row)[0]["sets"].items() if section != "task"}
    sets["block"] = {k: v for k, v in sets.get("block", {}).items() if k in declared}
    base_sets = _evals(spec, base)[0]["sets"]
    changed = {k: v for k, v in sets["block"].items() if base_sets.get("block", {}).get(k, declared[k].default) != v}
    return {**sets, "block": changed} if changed else None


def _run_sweeps(spec: SearchSpec, evals: list[tuple[tuple[int, str], EvalSpec]], console=None) -> list[str]:
    """Each sweep's result file, each distinct sweep run once (two trials' controls may be the same
    configuration). With ``--workers K`` on this machine the sweeps share K processes, as the trials did
    (each with its share of the cores, progress in ``STUDY_DIR/confirm-TRIAL-TASK.log``); on a Ray cluster,
    or with one worker, they run one after the other here (on Ray each sweep's runs spread over the nodes)."""
    from archbench.sweep import run_eval

    first: dict[str, tuple] = {}
    for label, ev in evals:
        first.setdefault(_sweep_key(ev), (label, ev))
    distinct = list(first.items())
    workers = min(spec.workers, len(distinct))
    if workers <= 1 or spec.ray:
        files = {k: run_eval(ev, console=console)["files"]["result"] for k, (_, ev) in distinct}
        return [files[_sweep_key(ev)] for _, ev in evals]
    if console is not None:
        console.print(f"confirmation: {len(distinct)} sweeps on {workers} processes, progress in "
                      f"{spec.study_dir}/confirm-*.log", soft_wrap=True)
    threads = threads_each(workers)
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_sweeper,
                             initargs=(spec.plugins, threads, os.getpid())) as pool:
        futures = {pool.submit(_sweep, ev, spec.study_dir / f"confirm-{_name(label)}-{ev.task}.log"): (k, label, ev)
                   for k, (label, ev) in distinct}
        files = {}
        for done, future in enumerate(as_completed(futures), 1):
            k, label, ev = futures[future]
            files[k] = future.result()  # a failed sweep stops the confirmation here; finished runs stay cached
            if console is not None:
                console.print(f"confirmation {done}/{len(distinct)}: {_name(label, ' ')} ({ev.block}) on {ev.task} done")
        return [files[_sweep_key(ev)] for _, ev in evals]


def _sweep_key(ev: EvalSpec) -> str:
    return json.dumps(dataclasses.asdict(ev), sort_keys=True, default=str)


def _name(label: tuple[int, str], sep: str = "-") -> str:
    number, role = label
    if sep == "-":
        return str(number) if role == "trial" else f"{number}-control"
    return f"trial {number}" if role == "trial" else f"trial {number}'s control"


def _sweeper(plugins: list[str], threads: int, parent: int) -> None:
    import torch

    from archbench.registry import load_plugin_file

    stop_with(parent)  # no sweep trains on for a command that was killed
    torch.set_num_threads(threads)
    for path in plugins:
        load_plugin_file(path)


def _sweep(ev: EvalSpec, log_path) -> str:
    from rich.console import Console

    from archbench.sweep import run_eval

    with open(log_path, "a", buffering=1) as log:
        return run_eval(ev, console=Console(file=log, force_terminal=False, width=120))["files"]["result"]


def _against(objective: str, spec: SearchSpec, mine: dict, base: dict, name: str = "the baseline",
             metric: str | None = None) -> dict:
    """The trial's objective (or the held-out ``metric`` of its task) minus the other sweep's (``name``: the
    baseline's, or the trial's control's), with the paired bootstrap interval over seeds."""
    task = OBJECTIVES[objective].task or spec.task
    a, b = mine[task], base[task]
    kind = metric or COMPARED.get(objective, "none")
    if kind == "none":
        return {"verdict": "no replicate interval for this objective"}
    if kind is None:
        c = compare(a, b)["comparisons"][0]["alpha"]
        return {"a": c["a"], "b": c["b"], "diff": c["diff"], "ci95": c["ci95"], "verdict": _verdict(objective, c["ci95"], name)}
    c = compare_metric(a, b, kind)
    return {"metric": c["metric"], "depth": c["a"]["depth"], "a": c["a"]["mean"], "b": c["b"]["mean"], "diff": c["diff"],
            "ci95": c["ci95"], "verdict": _verdict(objective, c["ci95"], name)}


def _headline(task: str, result_path: str) -> str:
    import torch

    from archbench.registry import TASKS
    from archbench.sweep import make_task

    result = json.loads(Path(result_path).read_text())
    return make_task(TASKS.get(task), result["config"]["task"], torch.device("cpu")).headline_metric()


def _verdict(objective: str, ci, name: str) -> str:
    if ci is None:
        return "no interval"
    better = "higher" if OBJECTIVES[objective].direction == "maximize" else "lower"
    if ci[0] > 0 or ci[1] < 0:
        higher = ci[0] > 0
        return f"better than {name}" if (better == "higher") == higher else f"worse than {name}"
    return f"not distinguishable from {name} (the interval covers 0)"
