"""``archbench eval``: train a block at several depths on a task and measure how it uses depth."""

from __future__ import annotations

from archbench.errors import UsageError
from archbench.evaluator import point_label

NAME = "eval"
HELP = "train a block at several depths on a task, fit alpha_ell, write result JSON and plots"


def int_list(text: str, option: str = "--depths") -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated integers such as 6,12,24") from None


def add_arguments(p):
    p.add_argument("--block", default="residual-mlp", help="registered block name (default: residual-mlp)")
    p.add_argument("--task", default="teacher-student", help="registered task name (default: teacher-student)")
    p.add_argument("--preset", default="quick", help="smoke (CI, <1 min CPU), quick (~10 min CPU), paper (GPU)")
    p.add_argument("--depths", type=str, default=None, help="effective depths, e.g. 6,12,24 (default: preset's)")
    p.add_argument("--recurrence", type=str, default=None,
                   help="recurrent blocks: iteration counts r, e.g. 1,2,4,8, swept at fixed parameters "
                        "(replaces --depths; effective depth = prelude + r*core + coda)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per depth (default: preset's)")
    p.add_argument("--teachers", type=int, default=None, metavar="N",
                   help="replicate over teachers 0..N-1 too, on tasks with teachers (default: preset's)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a knob: task.teacher=tied, train.steps=2000, model.width=32, block.heads=2; "
                        "a comma list sweeps it: task.k=1,2,4")
    p.add_argument("--evaluators", default=None,
                   help="comma-separated evaluator names (default: the task's, e.g. alpha-ell or depth-to-solve)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--engine", choices=["auto", "batched", "plain"], default="auto",
                   help="auto: train the sweep's runs together where that is exact (same losses as one by one), "
                        "else one by one; batched: insist; plain: the reference loop, one run after another")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="batched engine: torch.compile the training step (fused kernels; seconds to compile per "
                        "model shape); auto: for runs of 2000 steps or more")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="train the runs on a Ray cluster, one task each: auto (the cluster this machine is in), "
                        "HOST:6379 or ray://HOST:10001; records and results are written here as usual")
    p.add_argument("--runs-dir", default="runs", help="where run records and results go (default: ./runs)")
    p.add_argument("--out", default=None, help="result JSON path (plots are written beside it)")


def run(args) -> int:
    from rich.console import Console

    from archbench.config import EvalSpec, parse_sets
    from archbench.sweep import run_eval

    spec = EvalSpec(block=args.block, task=args.task, preset=args.preset,
                    depths=int_list(args.depths) if args.depths else None, seeds=args.seeds, teachers=args.teachers,
                    recurrence=int_list(args.recurrence, "--recurrence") if args.recurrence else None,
                    sets=parse_sets(args.sets),
                    evaluators=[e for e in args.evaluators.split(",") if e] if args.evaluators else None,
                    device=args.device, runs_dir=args.runs_dir, out=args.out, engine=args.engine,
                    compile=args.compile, ray=args.ray)
    err = Console(stderr=True, highlight=False)
    result = run_eval(spec, console=err)

    console = Console(highlight=False)
    console.print(runs_table(result))
    for line in summary_lines(result):
        console.print(line, soft_wrap=True)
    console.print(f"result: {result['files']['result']}")
    for p in result["files"]["plots"]:
        console.print(f"plot:   {p}")
    failed = sum(r["status"] != "ok" for r in result["runs"])
    if failed:
        err.print(f"[yellow]{failed} run(s) failed; see the table[/]")
    return 0


def runs_table(result):
    from rich.table import Table

    runs = result["runs"]
    gridded = any(r["vary"] for r in runs)
    judged = any(r.get("solved") is not None for r in runs)
    teachers = any(r.get("teacher") is not None for r in runs)
    table = Table(title=f"{result['block']} on {result['task']} ({result['config']['preset']}, {result['env']['device']})")
    for col in ["grid point"] * gridded + ["teacher"] * teachers + ["depth", "seed", "params", "test loss"] + \
            ["solved"] * judged + ["status", "train s", "cached"]:
        table.add_column(col, justify="left" if col == "grid point" else "right")
    for r in runs:
        loss = f"{r['final_loss']:.5g}" if r["status"] == "ok" else r.get("failure") or "-"
        row = [point_label(r["vary"])] * gridded + [str(r.get("teacher"))] * teachers + \
            [str(r["depth"]), str(r["seed"]), f"{r['params']:,}", loss]
        row += [{True: "yes", False: "no", None: "-"}[r.get("solved")]] * judged
        table.add_row(*row, r["status"], f"{r['wall_s']:.1f}", "yes" if r["cached"] else "")
    return table


def summary_lines(result) -> list[str]:
    """One line per sweep-evaluator result: alpha_ell (per grid point), depth-to-solve, error by k."""
    lines = []
    metrics = result["metrics"]
    if "alpha-ell" in metrics:
        alpha = metrics["alpha-ell"]
        for a in alpha.get("points", [alpha]):
            where = f" ({point_label(a['vary'])})" if a.get("vary") else ""
            if a.get("value") is None:
                lines.append(f"alpha_ell{where}: not fitted ({a.get('note', 'no runs')})")
                continue
            ci = f"  95% CI [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]" if a.get("ci95") else ""
            lines.append(f"alpha_ell{where} = {a['value']:.3f}{ci}" + (f"  ({a['note']})" if a.get("note") else ""))
            if a.get("by_step"):
                lines.append(f"alpha_ell{where} against training steps: " + ", ".join(
                    f"{b['step']}: {b['value']:.3f}" + (f" [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]" if b["ci95"] else "")
                    for b in a["by_step"]))
    for r in metrics.get("regime", {}).get("points", [metrics.get("regime")]):
        if r:
            where = f" ({point_label(r['vary'])})" if r.get("vary") else ""
            lines.append(f"regime{where}: {r['regime']} ({'; '.join(r['reasons'])})")
    if metrics.get("layer-correspondence", {}).get("relative_depth_deviation") is not None:
        lc = metrics["layer-correspondence"]
        lines.append(f"layer correspondence: best matches deviate {lc['relative_depth_deviation']:.2f} from equal "
                     f"relative depth on average (0 = exactly proportional)")
    if "depth-to-solve" in metrics:
        for row in metrics["depth-to-solve"]["difficulties"]:
            d = row["depth_to_solve"]
            got = f"depth {d}" if d is not None else f"not solved up to depth {row['max_depth_tried']}"
            seeds = row.get("depth_to_solve_by_seed", {})
            if len(seeds) > 1:
                got += " (seeds: " + ", ".join("–" if v is None else str(v) for v in seeds.values()) + ")"
            lines.append(f"depth to solve ({row['label']}): {got}")
        if "layers_per_step" in metrics["depth-to-solve"]:
            lines.append(f"layers per step of difficulty: {metrics['depth-to-solve']['layers_per_step']:.2f}")
    for e in metrics.get("error-by-k", {}).get("points", [metrics.get("error-by-k")]):
        for row in (e or {}).get("per_depth", []):
            where = f" ({point_label(e['vary'])})" if e.get("vary") else ""
            solved = row["largest_k_solved"]
            lines.append(f"error by k{where}, depth {row['depth']}: " + " ".join(
                f"k{k} {err:.3f}" for k, err in zip(e["k"], row["error"])) + "; solves k <= "
                + (str(solved) if solved is not None else "none") + f" (error <= {e['solved_at']:g})")
    return lines
