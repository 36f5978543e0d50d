"""``archbench leaderboard``: Markdown, CSV and JSON tables from run records and studies."""

from __future__ import annotations

NAME = "leaderboard"
HELP = "build leaderboard tables (Markdown, CSV, JSON) from run records and search studies"


def add_arguments(p):
    p.add_argument("--runs-dir", dest="runs_dirs", action="append", default=None,
                   help="a runs directory to read records from (repeatable; default: ./runs)")
    p.add_argument("--out", default="leaderboards", help="where the tables go (default: ./leaderboards)")
    p.add_argument("--study", dest="studies", action="append", default=[],
                   help="a search study whose trials label the rows they produced (repeatable)")
    p.add_argument("--storage", default=None, help="the studies' storage (default: sqlite:///RUNS_DIR/studies.db)")
    p.add_argument("--task", default=None, help="only this task's tables")
    p.add_argument("--all-versions", action="store_true",
                   help="keep sweeps trained at other versions of their block, task or archbench's numerics "
                        "(default: left out)")


def run(args) -> int:
    from rich.console import Console

    from archbench.leaderboard import build

    err = Console(stderr=True, highlight=False)
    runs_dirs = args.runs_dirs or ["runs"]
    files, skipped, notes, n = build(runs_dirs, args.out, args.studies, args.storage, args.task,
                                      all_versions=args.all_versions)
    for line in skipped:
        err.print(f"skipped {line}", markup=False, soft_wrap=True)
    for line in notes:
        err.print(f"note: {line}", markup=False, soft_wrap=True)
    out = Console(highlight=False)
    if not files:
        err.print(f"no run records found in {', '.join(runs_dirs)}" + (f" for task {args.task}" if args.task else ""))
        return 1
    out.print(f"{n} run records -> {len(files) // 3} table(s):")
    for f in files:
        if f.suffix == ".md":
            out.print(f"  {f} (+ .csv, .json)")
    return 0
