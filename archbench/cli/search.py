"""``archbench search``: an Optuna study over block families, their knobs and sizes under a budget."""

from __future__ import annotations

import shlex

from archbench.cli.eval import int_list

NAME = "search"
HELP = "search block families and knobs (Optuna) for a steeper alpha_ell without paying in loss"


def add_arguments(p):
    from archbench.search import OBJECTIVES

    p.add_argument("--task", default="hop-induction", help="registered task name (default: hop-induction)")
    p.add_argument("--trials", type=int, default=30, help="trials the study should have in all (default: 30); "
                   "rerunning continues the study up to this number")
    p.add_argument("--study", default=None, help="study name (default: TASK-OBJECTIVES-PRESET)")
    p.add_argument("--storage", default=None, help="Optuna storage: sqlite:///PATH (default: RUNS_DIR/studies.db), "
                   "postgresql://USER@HOST/DB for many machines, or journal:PATH")
    p.add_argument("--objective", default="compose,lm-loss",
                   help="comma-separated, several make a Pareto search: "
                        + "; ".join(f"{o.name} ({o.direction[:3]}: {o.help})" for o in OBJECTIVES.values())
                        + " (default: compose,lm-loss: better at composition without paying in LM loss?)")
    p.add_argument("--space", default=None, metavar="FILE.toml",
                   help="blocks to draw and knob ranges (default: every block, every knob with a declared range)")
    p.add_argument("--budget", default="params", choices=["params", "flops", "none"],
                   help="size every trial to the baseline's parameters (default) or forward FLOPs at the largest "
                        "depth; none keeps the preset's width")
    p.add_argument("--baseline", default="residual",
                   help="block whose default configuration is trial 0 and sets the budget (default: residual; "
                        "'none' for no baseline trial)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine, or tasks on the Ray "
                   "cluster of --ray (default: 1)")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="run the workers on a Ray cluster: auto, HOST:6379 or ray://HOST:10001 (the storage and "
                        "--runs-dir must be reachable from its nodes: PostgreSQL, or a shared file system)")
    p.add_argument("--pruner", default="median", choices=["median", "hyperband", "sha", "none"],
                   help="single-objective studies: median stops a trial behind the median after a depth; hyperband "
                        "and sha (successive halving) rank trials on held-out metrics along training steps")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default: 0)")
    p.add_argument("--confirm", type=int, default=0, metavar="SEEDS",
                   help="after the trials, re-run the best ones (the Pareto front) and the baseline with SEEDS (>= 3) "
                        "seeds at the preset's steps and compare each objective with the baseline's (default: 0, no)")
    p.add_argument("--preset", default=None, help="budget of every trial's eval: search (the default where every "
                   "task of the study has it: one depth, one seed), smoke, quick, paper")
    p.add_argument("--depths", type=str, default=None, help="effective depths of every trial (default: preset's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per depth (default: preset's)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="fix a knob for every trial, e.g. train.steps=1000 or task.teacher=tied")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--runs-dir", default="runs", help="run records and the default study database (default: ./runs)")


def run(args) -> int:
    from rich.console import Console

    from archbench.search import SearchSpec, parse_objectives, run_search
    from archbench.config import parse_sets

    spec = SearchSpec(task=args.task, trials=args.trials, study=args.study, storage=args.storage,
                      objectives=parse_objectives(args.objective), space=args.space, workers=args.workers,
                      preset=args.preset or default_preset(args.task, parse_objectives(args.objective)), depths=int_list(args.depths) if args.depths else None,
                      seeds=args.seeds, sets=parse_sets(args.sets), budget=args.budget,
                      baseline=None if args.baseline == "none" else args.baseline, pruner=args.pruner,
                      seed=args.seed, device=args.device, runs_dir=args.runs_dir, plugins=list(args.plugins),
                      ray=args.ray)
    err = Console(stderr=True, highlight=False)
    err.print(f"study {spec.study_name} in {spec.storage_url}: {spec.trials} trials, objectives "
              f"{', '.join(spec.objectives)}, budget {spec.budget}, {spec.workers} worker(s)", soft_wrap=True)
    result = run_search(spec, console=err, on_trial=lambda t: err.print(trial_line(t, spec.objectives), soft_wrap=True))
    out = Console(highlight=False)
    out.print(best_table(result))
    for line in summary_lines(result, spec):
        out.print(line, soft_wrap=True)
    confirmation = None
    if args.confirm:
        from archbench.search.confirm import confirm

        confirmation = confirm(spec, result, args.confirm, console=err)
        for line in confirmation_lines(confirmation):
            out.print(line, soft_wrap=True)
    from archbench.search.table import study_table, write_study_table

    command = "archbench " + " ".join(shlex.quote(a) for a in args.argv)
    files = write_study_table(study_table(spec, result, confirmation, command), spec.study_dir)
    out.print(f"table: {files[-1]}", soft_wrap=True)
    return 0


def default_preset(task: str, objectives: list[str]) -> str:
    """``search`` where the study's task and every objective's task have that preset, else ``quick``."""
    from archbench.registry import TASKS
    from archbench.search import OBJECTIVES

    tasks = {task} | {OBJECTIVES[o].task for o in objectives if OBJECTIVES[o].task}
    return "search" if all("search" in getattr(TASKS.get(t).obj, "presets", {}) for t in tasks) else "quick"


def confirmation_lines(c: dict) -> list[str]:
    lines = [f"confirmed with {c['seeds']} seeds against the baseline (trial {c['baseline']}), each difference "
             f"with its paired bootstrap 95 % interval:"]
    for t in c["trials"]:
        lines.append(f"  trial {t['number']} {t['block']}: " + _differences(t["objectives"]))
        if t.get("control"):
            knobs = ", ".join(f"{k}={v}" for k, v in t["control"]["knobs"].items())
            lines.append(f"    against its control (the baseline block with {knobs}): "
                         + _differences(t["control"]["objectives"]))
    if not c["trials"]:
        lines.append("  no trial besides the baseline among the best: nothing to confirm")
    wins = [t["number"] for t in c["trials"] if t["win"]]
    lines.append("beat the baseline (better on an objective beyond the noise, worse on none): "
                 + (", ".join(f"trial {n}" for n in wins) if wins else "none") + f"; details in {c['file']}")
    controlled = [t for t in c["trials"] if t.get("control")]
    if controlled:
        lines.append("beat their controls too: " + (", ".join(f"trial {t['number']}" for t in controlled
                                                             if t["control"]["win"]) or "none"))
    return lines


def _differences(objectives: dict) -> str:
    parts = []
    for o, v in objectives.items():
        ci = f" [{v['ci95'][0]:+.4g}, {v['ci95'][1]:+.4g}]" if v.get("ci95") else ""
        parts.append(f"{o} {v['diff']:+.4g}{ci}: {v['verdict']}" if "diff" in v else f"{o}: {v['verdict']}")
    return "; ".join(parts)


def trial_line(t, objectives) -> str:
    from archbench.search import trial_row

    row = trial_row(t, objectives)
    what = f"trial {row['number']} {row['block'] or '?'}" + (" (baseline)" if row["baseline"] else "")
    if row["state"] == "COMPLETE":
        return f"{what}: " + ", ".join(f"{k} {v:.4g}" for k, v in row["values"].items()) + f"  ({row['wall_s']:.0f} s)"
    if row["state"] == "PRUNED":
        return f"{what}: [yellow]pruned[/]"
    return f"{what}: [red]failed[/] ({row['failure'] or 'cut off; a rerun queues it again'})"


def best_table(result):
    from rich.table import Table

    multi = len(result["objectives"]) > 1
    table = Table(title=f"{result['study']}: {'Pareto front' if multi else 'best trials'} "
                        f"({result['counted']} trials: " + ", ".join(f"{v} {k.lower()}" for k, v in result['states'].items()) + ")")
    for col in ["trial", "block", "knobs", "width", "params", *result["objectives"], "s"]:
        table.add_column(col, justify="left" if col in ("block", "knobs") else "right")
    rows = result["best"] + ([result["baseline"]] if result["baseline"] and result["baseline"] not in result["best"] else [])
    for r in rows:
        knobs = ", ".join(f"{k}={_fmt(v)}" for k, v in r["knobs"].items())
        values = [_fmt(r["values"][o]) for o in result["objectives"]]
        table.add_row(str(r["number"]) + (" (baseline)" if r["baseline"] else ""), r["block"], knobs,
                      str(r["width"] or "-"), f"{r['params']:,}" if r["params"] else "-", *values, f"{r['wall_s']:.0f}")
    return table


def summary_lines(result, spec) -> list[str]:
    from archbench.search import eval_command

    lines = []
    base = result["baseline"]
    if base is not None and "alpha" in result["objectives"]:
        what = "at equal or better loss " if "loss" in result["objectives"] else ""
        beats = result["beats_baseline"]
        lines.append(f"beat the {base['block']} baseline's alpha_ell {base['values']['alpha']:.3f} {what}"
                     f"(same budget): " + (", ".join(f"trial {n}" for n in beats) if beats else "none"))
    for r in result["best"][:3]:
        lines.append(f"reproduce trial {r['number']}: {eval_command(r, spec)}")
    if result.get("figures"):
        lines.append("figures: " + ", ".join(result["figures"]))
    lines.append(f"trials' training time: {result['wall_s']:.0f} s; watch the study with: "
                 f"optuna-dashboard {result['storage']}")
    return lines


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
