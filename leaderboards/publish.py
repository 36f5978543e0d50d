"""Rebuild the published leaderboards in this folder: one command, resumable.

    python leaderboards/publish.py [--runs-dir runs/publish] [--device auto] [--workers K]
                                   [--only sweeps|search|promote|collect|tables]

1. every built-in block at the ``quick`` preset on teacher-student (independent and tied teacher) and on
   cfg-language (compositional: nested brackets), each with alpha-ell and the regime evidence
   (cfg-language adds depth-to-solve). A block that cannot be built at the preset's depths gets them
   times the smallest whole factor it can (recurrent-depth and hourglass on cfg-language: 3, 6, 12);
2. an architecture search of ``--trials`` (30) trials on teacher-student, objectives alpha and loss,
   budget: the residual block's parameters; trials train ``--search-steps`` steps (a quarter of quick)
   to make 30 trials affordable on a CPU;
3. the search's Pareto front, its baseline and its 5 steepest other trials (by α_ℓ) re-run at the full
   ``quick`` preset, so that they sit in the same tables;
4. collect: the run records of the published tasks (JSON, no weights) copied to ``leaderboards/records/``,
   and the search's finished trials to ``leaderboards/studies/``, both committed beside the tables;
5. tables: ``archbench leaderboard`` over the committed records alone, rows labelled with their search
   trials. ``--only tables`` rebuilds the committed tables from the repository, byte for byte but the
   build dates.

Every finished run is a cached record under ``--runs-dir``: rerunning continues where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

from rich.console import Console

from archbench.config import EvalSpec, resolve_config
from archbench.errors import UsageError
from archbench.leaderboard import build
from archbench.records import RunStore, write_json
from archbench.registry import BLOCKS
from archbench.search import SearchSpec, run_search
from archbench.sweep import run_eval

HERE = Path(__file__).resolve().parent
STUDY = "publish-teacher-student"
BUILT_BY = "python leaderboards/publish.py"  # one name for every build, so that a rebuild is byte-identical
SWEEPS = {  # table -> (task, fixed settings, evaluators)
    "teacher-student (independent teacher)": ("teacher-student", {"task": {"teacher": "independent"}},
                                              ["alpha-ell", "regime"]),
    "teacher-student (tied teacher)": ("teacher-student", {"task": {"teacher": "tied"}}, ["alpha-ell", "regime"]),
    "cfg-language": ("cfg-language", {}, ["alpha-ell", "depth-to-solve", "regime"]),
}


def buildable(spec: EvalSpec) -> EvalSpec:
    """``spec``, or, where its block cannot be built at some of the preset's depths (recurrent-depth and
    hourglass have no depth 1), the preset's depths times the smallest whole factor that it can be built
    at: the depth ratios α_ℓ is fitted over stay the preset's, and the table shows the depths."""
    try:
        resolve_config(spec)
        return spec
    except UsageError as e:
        first = e
    depths = resolve_config(dataclasses.replace(spec, block="residual", sets={})).depths  # the preset's
    for factor in range(2, 9):
        scaled = dataclasses.replace(spec, depths=[d * factor for d in depths])
        try:
            resolve_config(scaled)
            return scaled
        except UsageError:
            continue
    raise first


def promoted(result: dict, study: str, storage: str, steepest: int = 5) -> list[dict]:
    """The Pareto front, the baseline, and the ``steepest`` other configurations by α_ℓ (a repeated
    configuration counts once)."""
    import optuna

    from archbench.search import open_storage, trial_row

    rows = list(result["best"])
    if result["baseline"] and result["baseline"] not in rows:
        rows.append(result["baseline"])
    done = optuna.load_study(study_name=study, storage=open_storage(storage, heartbeat=False)).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    added = 0
    for r in sorted((trial_row(t, result["objectives"]) for t in done), key=lambda r: -r["values"]["alpha"]):
        if added == steepest:
            break
        if all(r["eval"] != x["eval"] for x in rows):
            rows.append(r)
            added += 1
    return rows


def collect(runs_dir: Path, here: Path, tasks: list[str], storage: str | None = None) -> int:
    """Copy the run records of ``tasks`` (JSON, no weights) to ``here/records`` and the search's finished
    trials to ``here/studies``, so that the tables can be rebuilt from the repository; returns how many
    records were copied."""
    copied = 0
    (here / "records").mkdir(parents=True, exist_ok=True)
    for path, record, _ in RunStore(runs_dir).scan():
        if record is not None and record.task in tasks:
            shutil.copyfile(path, here / "records" / path.name)
            copied += 1
    if storage:
        import optuna

        from archbench.search import open_storage

        st = open_storage(storage, heartbeat=False)
        if STUDY in optuna.get_all_study_names(st):
            trials = optuna.load_study(study_name=STUDY, storage=st).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            write_json(here / "studies" / f"{STUDY}.json",
                       [{"number": t.number, "eval": t.user_attrs.get("eval", {})} for t in trials])
    return copied


def tables(here: Path, tasks: list[str]) -> list[str]:
    """Build every published table from the committed records under ``here/records``, rows labelled with
    the committed studies; returns what to tell the user."""
    if not (here / "records").is_dir():
        return [f"no committed run records in {here / 'records'}: nothing to rebuild (leaderboards/README.md says "
                f"which tables predate them)"]
    studies = {p.stem: json.loads(p.read_text()) for p in sorted((here / "studies").glob("*.json"))}
    lines = []
    cwd = os.getcwd()
    os.chdir(here.parent)  # records are named relative to the repository, the same on every machine
    try:
        for task in tasks:
            files, skipped, notes, n = build([here.name], here.name, [], None, task, command=BUILT_BY,
                                             trials=studies)
            lines += [f"skipped {line}" for line in skipped] + [f"note: {line}" for line in notes]
            lines.append(f"{task}: {n} run records -> {len(files) // 3} tables in {here}")
    finally:
        os.chdir(cwd)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default="runs/publish")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=1, help="search worker processes")
    p.add_argument("--trials", type=int, default=30)
    p.add_argument("--search-steps", type=int, default=1000)
    p.add_argument("--blocks", default=None, help="comma-separated (default: every built-in block)")
    p.add_argument("--only", choices=["sweeps", "search", "promote", "collect", "tables"], default=None,
                   help="one step (default: all, in order); tables rebuilds the committed tables from the "
                        "committed records")
    args = p.parse_args(argv)
    err = Console(stderr=True, highlight=False)
    blocks = args.blocks.split(",") if args.blocks else [e.name for e in BLOCKS.entries()]

    if args.only in (None, "sweeps"):
        for label, (task, sets, evaluators) in SWEEPS.items():
            for block in blocks:
                err.rule(f"{block} on {label}")
                spec = buildable(EvalSpec(block=block, task=task, preset="quick", sets=sets, evaluators=evaluators,
                                          device=args.device, runs_dir=args.runs_dir, plots=False))
                run_eval(spec, console=err)
    search = SearchSpec(task="teacher-student", trials=args.trials, study=STUDY, preset="quick",
                        sets={"train": {"steps": str(args.search_steps)}}, workers=args.workers,
                        device=args.device, runs_dir=args.runs_dir)
    if args.only in (None, "search", "promote"):
        result = run_search(search, console=err, on_trial=lambda t: err.print(f"trial {t.number}: {t.state.name}"))
        if args.only == "search":
            return 0
        for row in promoted(result, search.study_name, search.storage_url):
            ev = row["eval"]
            sets = {s: kv for s, kv in ev["sets"].items() if s != "train"}  # the full quick training budget
            err.rule(f"search trial {row['number']} ({ev['block']}) at the quick preset")
            run_eval(EvalSpec(block=ev["block"], task="teacher-student", preset="quick", sets=sets,
                              evaluators=["alpha-ell", "regime"], device=args.device, runs_dir=args.runs_dir,
                              plots=False), console=err)
    if args.only in (None, "collect"):
        collect(Path(args.runs_dir), HERE, [task for task, _, _ in SWEEPS.values()], search.storage_url)
    if args.only in (None, "tables"):
        for line in tables(HERE, sorted({task for task, _, _ in SWEEPS.values()})):
            err.print(line, markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
