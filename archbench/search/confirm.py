"""Confirmation: the best trials (the Pareto front) and the baseline re-run at the preset's full budget
with several seeds, each objective compared with the baseline's by ``archbench compare``'s paired
bootstrap interval. A search finds candidates cheaply; only a difference whose interval excludes 0 here
counts as a win."""

from __future__ import annotations

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


def confirm(spec: SearchSpec, summary: dict, seeds: int, console=None) -> dict:
    """Re-run the summary's best trials and its baseline with ``seeds`` seeds and no ``train.steps``
    override (the preset's budget); returns, and writes beside the study, each trial's objectives
    against the baseline's with the interval of the difference and a verdict."""
    results: dict[int, dict[str, str]] = {}
    evals = confirmation_evals(spec, summary, seeds)
    for (number, ev), result in zip(evals, _run_sweeps(spec, evals, console)):
        results.setdefault(number, {})[ev.task] = result
    base = summary["baseline"]
    out = {"study": spec.study_name, "seeds": seeds, "baseline": base["number"],
           "baseline_results": results[base["number"]], "trials": []}
    for row in [r for r in summary["best"] if r["number"] != base["number"]]:
        against = {o: _against(o, spec, results[row["number"]], results[base["number"]]) for o in spec.objectives}
        verdicts = [v["verdict"] for v in against.values()]
        # beside compose, the task's headline (hop-induction: the error at the hardest k), for the record
        also = {f"{o}@{m}": _against(o, spec, results[row["number"]], results[base["number"]], metric=m)
                for o in spec.objectives if o == "compose"
                for m in [_headline(OBJECTIVES[o].task, results[base["number"]][OBJECTIVES[o].task])]}
        out["trials"].append({"number": row["number"], "block": row["block"], "knobs": row["knobs"],
                              "results": results[row["number"]], "objectives": against, "also": also,
                              # a win: better on one objective at least, beyond the noise, and worse on none
                              "win": any(v.startswith("better") for v in verdicts)
                              and not any(v.startswith("worse") for v in verdicts)})
    path = spec.study_dir / "confirmation.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(json.dumps(out, indent=1).encode()))
    out["file"] = str(path)
    return out


def confirmation_evals(spec: SearchSpec, summary: dict, seeds: int) -> list[tuple[int, EvalSpec]]:
    """(trial number, eval) of every sweep a confirmation runs: the baseline's first, then each best trial's,
    one per task, with ``seeds`` seeds at the preset's steps."""
    if seeds < 3:
        raise UsageError(f"--confirm {seeds}: a confirmation needs at least 3 seeds for an interval")
    base = summary["baseline"]
    if base is None:
        raise UsageError("--confirm needs the study's baseline trial (run without --baseline none)")
    out = []
    for row in [base] + [r for r in summary["best"] if r["number"] != base["number"]]:
        for ev in row.get("evals") or [{**row["eval"], "task": spec.task, "preset": spec.preset}]:
            sets = {s: {k: v for k, v in kv.items() if (s, k) != ("train", "steps")} for s, kv in ev["sets"].items()}
            out.append((row["number"], EvalSpec(block=ev["block"], task=ev["task"], preset=ev["preset"], seeds=seeds,
                                                sets=sets, depths=spec.depths if ev["task"] == spec.task else None,
                                                device=spec.device, runs_dir=spec.runs_dir, plots=False,
                                                ray=spec.ray)))
    return out


def _run_sweeps(spec: SearchSpec, evals: list[tuple[int, EvalSpec]], console=None) -> list[str]:
    """Each sweep's result file. With ``--workers K`` on this machine the sweeps share K processes, as the
    trials did (each with its share of the cores, progress in ``STUDY_DIR/confirm-TRIAL-TASK.log``); on a
    Ray cluster, or with one worker, they run one after the other here (on Ray each sweep's runs spread
    over the nodes)."""
    from archbench.sweep import run_eval

    workers = min(spec.workers, len(evals))
    if workers <= 1 or spec.ray:
        return [run_eval(ev, console=console)["files"]["result"] for _, ev in evals]
    if console is not None:
        console.print(f"confirmation: {len(evals)} sweeps on {workers} processes, progress in "
                      f"{spec.study_dir}/confirm-*.log", soft_wrap=True)
    threads = threads_each(workers)
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_sweeper,
                             initargs=(spec.plugins, threads, os.getpid())) as pool:
        futures = {pool.submit(_sweep, ev, spec.study_dir / f"confirm-{number}-{ev.task}.log"): (number, ev)
                   for number, ev in evals}
        for done, future in enumerate(as_completed(futures), 1):
            number, ev = futures[future]
            future.result()  # a failed sweep stops the confirmation here; finished runs stay cached
            if console is not None:
                console.print(f"confirmation {done}/{len(evals)}: trial {number} ({ev.block}) on {ev.task} done")
        return [f.result() for f in futures]


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


def _against(objective: str, spec: SearchSpec, mine: dict, base: dict, metric: str | None = None) -> dict:
    """The trial's objective (or the held-out ``metric`` of its task) minus the baseline's, with the paired
    bootstrap interval over seeds."""
    task = OBJECTIVES[objective].task or spec.task
    a, b = mine[task], base[task]
    kind = metric or COMPARED.get(objective, "none")
    if kind == "none":
        return {"verdict": "no replicate interval for this objective"}
    if kind is None:
        c = compare(a, b)["comparisons"][0]["alpha"]
        return {"a": c["a"], "b": c["b"], "diff": c["diff"], "ci95": c["ci95"], "verdict": _verdict(objective, c["ci95"])}
    c = compare_metric(a, b, kind)
    return {"metric": c["metric"], "depth": c["a"]["depth"], "a": c["a"]["mean"], "b": c["b"]["mean"], "diff": c["diff"],
            "ci95": c["ci95"], "verdict": _verdict(objective, c["ci95"])}


def _headline(task: str, result_path: str) -> str:
    import torch

    from archbench.registry import TASKS
    from archbench.sweep import make_task

    result = json.loads(Path(result_path).read_text())
    return make_task(TASKS.get(task), result["config"]["task"], torch.device("cpu")).headline_metric()


def _verdict(objective: str, ci) -> str:
    if ci is None:
        return "no interval"
    better = "higher" if OBJECTIVES[objective].direction == "maximize" else "lower"
    if ci[0] > 0 or ci[1] < 0:
        higher = ci[0] > 0
        return "better than the baseline" if (better == "higher") == higher else "worse than the baseline"
    return "not distinguishable from the baseline (the interval covers 0)"
