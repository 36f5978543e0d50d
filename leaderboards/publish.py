"""Rebuild the published leaderboards in this folder: one command, resumable.

    python leaderboards/publish.py [--runs-dir runs/publish] [--device auto] [--blocks a,b]
                                   [--only sweeps|collect|tables]

1. sweeps: every built-in block on each table of ``TABLES``, every row with replicates (teachers on
   teacher-student, student seeds elsewhere) so that its α_ℓ has an interval and the column against
   the table's baseline row (``archbench compare``) has one too:
   - teacher-student under the authors' exp-9-3 protocol (``paper-long``: shared frozen head, student
     logits over T, depth-scaled lr, hold-then-decay, fp32), tied and independent teacher, three
     teachers, at a CPU budget: depths 6, 12, 24 and ``TEACHER_STUDENT_STEPS`` steps instead of six
     depths and 80,000 steps;
   - hop-induction (Sanford et al.'s k-hop induction heads) at ``quick``, three student seeds, with the
     held-out error at the hardest k beside the loss;
   - word-problem (A5, length 4) at ``quick``, three student seeds, with the depth to solve and the
     accuracy at the worst position.
   A block that cannot be built at a table's depths gets them times the smallest whole factor it can
   (recurrent-depth and hourglass: 3, 6, 9, 12 for 1, 2, 3, 4);
   Records already committed in ``leaderboards/records/`` are copied into ``--runs-dir`` first, so
   they count as cached: a rebuild on a fresh machine trains only what is missing;
2. collect: the run records of the published tasks (JSON, no weights) copied to ``leaderboards/records/``,
   committed beside the tables (and ``studies/``, where a search labels rows, read as it is);
3. tables: ``archbench leaderboard`` over the committed records alone. ``--only tables`` rebuilds the
   committed tables from the repository, byte for byte but the build dates.

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
from archbench.records import RunStore
from archbench.registry import BLOCKS, TASKS
from archbench.search.study import SearchSpec
from archbench.sweep import run_eval

HERE = Path(__file__).resolve().parent
BUILT_BY = "python leaderboards/publish.py"  # one name for every build, so that a rebuild is byte-identical
# exp-9-3 at a CPU budget: three of the paper's six depths, and steps that fit every block in a few hours
TEACHER_STUDENT_STEPS = 1000
EXP_9_3 = dict(task="teacher-student", preset="paper-long", depths=[6, 12, 24], teachers=3,
               evaluators=["alpha-ell", "regime"])
TABLES = {  # name -> the EvalSpec fields every block's sweep shares
    "teacher-student-tied": dict(  # exp-9-3's own teacher
        EXP_9_3, sets={"train": {"steps": str(TEACHER_STUDENT_STEPS)}}),
    "teacher-student-independent": dict(
        EXP_9_3, sets={"task": {"teacher": "independent"}, "train": {"steps": str(TEACHER_STUDENT_STEPS)}}),
    # composition: the error at the hardest k is the headline column (cfg-language at quick is solved by one
    # layer of every block, so its table separated nothing; it stays in archive-2026-11-22/)
    "hop-induction": dict(task="hop-induction", preset="quick", seeds=3, evaluators=["alpha-ell", "error-by-k"]),
    # state tracking: A5 (not solvable) at length 4, where one residual layer fails and two solve it
    # (depths 1-3, one more than the preset's, so that α_ℓ has an interval)
    "word-problem": dict(task="word-problem", preset="quick", seeds=3, depths=[1, 2, 3],
                         evaluators=["alpha-ell", "depth-to-solve"]),
}


# The published searches: `archbench search` settings, the study continued to `trials` and confirmed with
# `confirm` seeds. Study, run records and table live in search/ (records apart from the sweep tables').
SEARCHES = {
    # which designs compose better (hop-induction error at k = 8, depth 4) without paying in lm-char loss?
    # Trials at a third of the hop-induction budget (1,000 of 3,000 steps), confirmed at all of it.
    "composition-search": dict(task="hop-induction", objectives=["compose", "lm-loss"], preset="search",
                               sets={"train": {"steps": "1000"}}, space="leaderboards/studies/composition-space.toml",
                               trials=100, workers=2, confirm=3),
}
SEARCH_DIR = HERE / "search"


def buildable(spec: EvalSpec) -> EvalSpec:
    """``spec``, or, where its block cannot be built at some of its depths (the preset's unless given;
    recurrent-depth and hourglass have no depth 1), those depths times the smallest whole factor that it
    can be built at: the depth ratios α_ℓ is fitted over stay the same, and the table shows the depths."""
    try:
        resolve_config(spec)
        return spec
    except UsageError as e:
        first = e
    depths = spec.depths or resolve_config(dataclasses.replace(spec, block="residual", sets={})).depths
    for factor in range(2, 9):
        scaled = dataclasses.replace(spec, depths=[d * factor for d in depths])
        try:
            resolve_config(scaled)
            return scaled
        except UsageError:
            continue
    raise first


def collect(runs_dir: Path, here: Path, tasks: list[str]) -> int:
    """Copy the run records of ``tasks`` (JSON, no weights) to ``here/records``, so that the tables can be
    rebuilt from the repository; returns how many records were copied."""
    copied = 0
    (here / "records").mkdir(parents=True, exist_ok=True)
    for path, record, _ in RunStore(runs_dir).scan():
        if record is not None and record.task in tasks:
            shutil.copyfile(path, here / "records" / path.name)
            copied += 1
    return copied


def seed(runs_dir: Path, here: Path) -> int:
    """Copy the committed records under ``here/records`` that ``runs_dir`` lacks into it, so that a rebuild on
    a fresh machine (or by another session) trains only what no one has; returns how many were copied."""
    copied = 0
    if (here / "records").is_dir():
        (runs_dir / "records").mkdir(parents=True, exist_ok=True)
        for path in sorted((here / "records").glob("*.json")):
            if not (runs_dir / "records" / path.name).exists():
                shutil.copyfile(path, runs_dir / "records" / path.name)
                copied += 1
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


def search_spec(label: str, runs_dir: Path, storage: str | None = None, device: str = "auto") -> tuple[SearchSpec, int]:
    settings = dict(SEARCHES[label])
    seeds = settings.pop("confirm")
    space = settings.pop("space", None)
    return SearchSpec(**settings, space=space and str(HERE.parent / space), runs_dir=str(runs_dir), storage=storage,
                      device=device), seeds


def journal(spec: SearchSpec) -> Path:
    return SEARCH_DIR / f"{spec.study_name}.journal"


def search(label: str, runs_dir: Path, device: str, console) -> None:
    """Continue the study (from the committed one, on a machine that has none) to its trials, then confirm."""
    import optuna

    from archbench.search import open_storage, run_search
    from archbench.search.confirm import confirm

    spec, seeds = search_spec(label, runs_dir / label, device=device)
    console.print(f"{seed(runs_dir / label, SEARCH_DIR)} committed run records copied into {runs_dir / label} (cached)")
    storage = open_storage(spec.storage_url)
    if spec.study_name not in optuna.get_all_study_names(storage) and journal(spec).exists():
        optuna.copy_study(from_study_name=spec.study_name, to_storage=storage,
                          from_storage=open_storage(f"journal:{journal(spec)}"))
    result = run_search(spec, console=console)
    confirm(spec, result, seeds, console=console)


def collect_search(label: str, runs_dir: Path) -> int:
    """The study as an Optuna journal file (text) and the run records of its trials and confirmation, into
    search/; returns how many records were copied."""
    import optuna

    from archbench.search import open_storage

    spec, _ = search_spec(label, runs_dir / label)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    SEARCH_DIR.mkdir(parents=True, exist_ok=True)
    fresh = journal(spec).with_suffix(".journal.new")
    fresh.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=spec.study_name, from_storage=open_storage(spec.storage_url, heartbeat=False),
                      to_storage=open_storage(f"journal:{fresh}", heartbeat=False))
    fresh.replace(journal(spec))
    copied = 0
    (SEARCH_DIR / "records").mkdir(exist_ok=True)
    for path, record, _ in RunStore(runs_dir / label).scan():
        if record is not None:
            shutil.copyfile(path, SEARCH_DIR / "records" / path.name)
            copied += 1
    return copied


def search_table(label: str) -> str:
    """The search's table from the committed study and records alone (nothing trains: a confirmation run the
    records lack leaves the table unconfirmed, and says so)."""
    import tempfile

    from archbench.search import open_study, study_space
    from archbench.search.confirm import confirm, confirmation_evals
    from archbench.search.figures import write_figures
    from archbench.search.results import summary
    from archbench.search.table import study_table, write_study_table
    from archbench.sweep import Sweep

    with tempfile.TemporaryDirectory() as scratch:
        seed(Path(scratch), SEARCH_DIR)
        spec, seeds = search_spec(label, Path(scratch))
        if not journal(spec).exists():
            return f"{label}: no committed study at {journal(spec)}: run publish.py --only sweeps first"
        # a copy: opening a journal study appends to the file, and the committed one stays as it is
        shutil.copyfile(journal(spec), Path(scratch) / "study.journal")
        spec = dataclasses.replace(spec, storage=f"journal:{Path(scratch) / 'study.journal'}")
        space, _ = study_space(spec)
        study = open_study(spec, space)
        result = summary(study, spec)
        write_figures(study, spec, out=SEARCH_DIR / spec.study_name)  # the Pareto front, the hypervolume history
        store = RunStore(scratch)
        evals = confirmation_evals(spec, result, seeds)
        missing, controls_missing = ([run.label for (_, r), ev in evals if r == role for run in Sweep(ev).runs
                                      if store.load(run.key) is None] for role in ("trial", "control"))
        confirmation = None if missing else confirm(spec, result, seeds, console=Console(quiet=True),
                                                    controls=not controls_missing)
        command = f"python leaderboards/publish.py --tables {label}"
        shown = dataclasses.replace(spec, runs_dir="runs", storage=None, space=SEARCHES[label].get("space"))
        files = write_study_table(study_table(shown, result, confirmation, command), SEARCH_DIR)
    note = (f" (not confirmed: {len(missing)} confirmation runs missing, e.g. {missing[0]})" if missing else
            f" (no controls: {len(controls_missing)} of their runs missing, e.g. {controls_missing[0]})"
            if controls_missing else "")
    return f"{label}: {result['counted']} trials -> {files[-1]}{note}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-dir", default="runs/publish")
    p.add_argument("--device", default="auto")
    p.add_argument("--blocks", default=None, help="comma-separated (default: every built-in block)")
    p.add_argument("--tables", default=None, help=f"comma-separated, from {', '.join([*TABLES, *SEARCHES])} "
                                                  f"(default: all, in that order)")
    p.add_argument("--only", choices=["sweeps", "collect", "tables"], default=None,
                   help="one step (default: all, in order); tables rebuilds the committed tables from the "
                        "committed records")
    args = p.parse_args(argv)
    err = Console(stderr=True, highlight=False)
    blocks = args.blocks.split(",") if args.blocks else [e.name for e in BLOCKS.entries()]
    labels = [label.strip() for label in args.tables.split(",")] if args.tables else [*TABLES, *SEARCHES]
    unknown = [label for label in labels if label not in TABLES and label not in SEARCHES]
    if unknown:
        p.error(f"--tables: unknown table {unknown[0]!r}; the tables are: {', '.join([*TABLES, *SEARCHES])}")
    searches, labels = [label for label in labels if label in SEARCHES], [label for label in labels if label in TABLES]
    tasks = sorted({TABLES[label]["task"] for label in labels})

    if args.only in (None, "sweeps"):
        err.print(f"{seed(Path(args.runs_dir), HERE)} committed run records copied into {args.runs_dir} (cached)")
        for label in labels:
            # the table's baseline first: every other row is compared with it
            baseline = TASKS.get(TABLES[label]["task"]).obj.baseline_block
            for block in sorted(blocks, key=lambda b: b != baseline):
                err.rule(f"{block} on {label}")
                spec = buildable(EvalSpec(block=block, device=args.device, runs_dir=args.runs_dir, plots=False,
                                          **TABLES[label]))
                run_eval(spec, console=err)
        for label in searches:
            err.rule(label)
            search(label, Path(args.runs_dir), args.device, err)
    if args.only in (None, "collect"):
        if tasks:
            err.print(f"collected {collect(Path(args.runs_dir), HERE, tasks)} run records into {HERE / 'records'}")
        for label in searches:
            err.print(f"{label}: study and {collect_search(label, Path(args.runs_dir))} run records into {SEARCH_DIR}")
    if args.only in (None, "tables"):
        for line in tables(HERE, tasks) if tasks else []:
            err.print(line, markup=False, soft_wrap=True)
        for label in searches:
            err.print(search_table(label), markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
