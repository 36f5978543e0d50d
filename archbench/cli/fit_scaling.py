"""``archbench fit-scaling``: fit L = c_m·m^-α_m + c_ℓ·ℓ^-α_ℓ + c_D·D^-α_D + L_0 to training runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

from archbench.errors import UsageError

NAME = "fit-scaling"
HELP = ("fit the depth scaling law L(m, ell, D) of Liu et al. to the Chinchilla runs (or your CSV): "
        "exponents with SE, bootstrap intervals, sensitivity table, JSON and plot")

LABELS = {"alpha_m": "α_m (width)", "alpha_ell": "α_ℓ (depth)", "alpha_D": "α_D (tokens)", "L0": "L_0"}


def add_arguments(p):
    p.add_argument("--csv", default=None, metavar="FILE",
                   help="runs CSV with columns loss, num_tokens, d_model, n_layers "
                        "(default: the bundled 245 Chinchilla runs)")
    p.add_argument("--exclude", type=int, default=40, metavar="N",
                   help="drop the N highest-loss runs, ties included (default: 40, the paper's; leaves 203)")
    p.add_argument("--depth-offset", type=int, default=0, metavar="K",
                   help="count depth as n_layers - K (default: 0; 2 excludes the first and last layer)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="B",
                   help="bootstrap resamples for the 95%% intervals (default: 200; 0 turns it off)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="bootstrap seed (default: 0)")
    p.add_argument("--no-sensitivity", action="store_true",
                   help="skip the table of alpha_ell over exclude 0..80 x depth offset 0, 2")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the result as JSON")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="predicted-vs-observed loss plot (default: beside --out, FILE.png, when --out is given)")


def run(args) -> int:
    from rich.console import Console

    from archbench import __version__
    from archbench.records import atomic_write_text
    from archbench.scaling import CITATION, fit_scaling, load_runs, plot_fit

    if args.exclude < 0:
        raise UsageError(f"--exclude {args.exclude}: must be >= 0")
    if args.bootstrap < 0:
        raise UsageError(f"--bootstrap {args.bootstrap}: must be >= 0 (0 turns it off)")
    runs = load_runs(args.csv)
    result = fit_scaling(runs, exclude=args.exclude, depth_offset=args.depth_offset,
                         bootstrap_resamples=args.bootstrap, seed=args.seed, sensitivity=not args.no_sensitivity)
    out = Path(args.out) if args.out else None
    plot = Path(args.plot) if args.plot else (out.with_suffix(".png") if out else None)
    result["paper"] = _paper(result) if runs.bundled else None
    result["archbench_version"] = __version__
    result["files"] = {"json": str(out) if out else None, "plot": str(plot) if plot else None}
    if plot:
        plot_fit(runs, result, plot)
    if out:
        atomic_write_text(out, json.dumps(result, indent=1, ensure_ascii=False) + "\n")

    console = Console(highlight=False)
    console.print(exponent_table(result))
    for line in summary_lines(result):
        console.print(line, soft_wrap=True)
    if result["sensitivity"]:
        console.print(sensitivity_table(result))
    if runs.bundled:
        console.print(f"data: {CITATION['data'][0]}; {CITATION['data'][1]}. Cite both.", soft_wrap=True)
    for what, path in result["files"].items():
        if path:
            console.print(f"{what + ':':7s} {path}")
    return 0


def _paper(result) -> dict:
    """The paper's reported numbers for this depth convention, when there are any."""
    from archbench.scaling import PAPER

    reported = {**PAPER[0], **PAPER.get(result["options"]["depth_offset"], {})}
    if result["options"]["depth_offset"] not in PAPER:
        reported.pop("alpha_ell")
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in reported.items()} | {
        "n_used": 203, "exclude": 40, "source": "Liu et al., arXiv 2602.05970, Sec. 1a of PAPERS.md"}


def _fmt_paper(p) -> str:
    if p is None:
        return "-"
    value, err = p
    if err is None:
        return f"≈{value:g}"
    digits = max(0, -math.floor(math.log10(err)))  # as many decimals as the reported error has
    return f"{value:.{digits}f} ± {err:.{digits}f}"


def exponent_table(result):
    from rich.table import Table

    o = result["options"]
    depth = "ℓ" if not o["depth_offset"] else f"ℓ−{o['depth_offset']}"
    title = (f"{result['model'].split('  ')[0]}\n{result['n_used']} of {result['data']['n_runs']} runs "
             f"(exclude {o['exclude']}, depth {depth})")
    table = Table(title=title)
    paper = result.get("paper")
    cols = ["parameter", "fit", "SE (Gauss-Newton)", f"95% bootstrap ({o['bootstrap']})"] + ["paper"] * bool(paper)
    for c in cols:
        table.add_column(c, justify="left" if c == "parameter" else "right")
    entries = {**result["exponents"], "L0": result["L0"]}
    for name, e in entries.items():
        se = f"{e['se']:.3f}" if e["se"] is not None else "singular"
        ci = f"[{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]" if e["ci95"] else "-"
        row = [LABELS[name], f"{e['value']:.3f}", se, ci]
        if paper:
            reported = paper.get(name)
            row.append(_fmt_paper(reported) if reported else "-")
        table.add_row(*row)
    return table


def summary_lines(result) -> list[str]:
    c = result["coefficients"]
    conv = result["convergence"]
    state = "converged" if conv["converged"] else "NOT converged"
    lines = [f"c_m = {c['c_m']['value']:.4g}, c_ℓ = {c['c_ell']['value']:.4g}, c_D = {c['c_D']['value']:.4g}, "
             f"L_0 = {result['L0']['value']:.4g}",
             f"mean relative error of L: {100 * result['mean_relative_error']:.2f} %"
             + (f" (paper: {100 * result['paper']['mean_relative_error']:.1f} %)" if result.get("paper") else ""),
             f"least squares {state}: {conv['message']} ({conv['nfev']} evaluations, "
             f"gradient {conv['optimality']:.1e}; "
             f"{conv['starts_reaching_best']} of {conv['starts']} starting points reached this optimum)"]
    b = result["bootstrap"]
    if b and b["converged"] < b["resamples"]:
        lines.append(f"bootstrap: {b['resamples'] - b['converged']} of {b['resamples']} resamples did not converge "
                     "and were left out")
    return lines


def sensitivity_table(result):
    from rich.table import Table

    rows = result["sensitivity"]
    offsets = sorted({r["depth_offset"] for r in rows})
    table = Table(title="α_ℓ ± SE by filter and depth convention")
    table.add_column("exclude", justify="right")
    table.add_column("runs", justify="right")
    for k in offsets:
        table.add_column("depth ℓ" if not k else f"depth ℓ−{k}", justify="right")
    o = result["options"]
    for exclude in sorted({r["exclude"] for r in rows}):
        cells = {r["depth_offset"]: r for r in rows if r["exclude"] == exclude}
        n = next((str(r["n_used"]) for r in cells.values() if "n_used" in r), "-")
        row = [str(exclude), n]
        for k in offsets:
            r = cells[k]
            if "error" in r:
                row.append("-")
                continue
            se = f"{r['se']:.2f}" if r["se"] is not None else "?"
            text = f"{r['alpha_ell']:.2f} ± {se}" + ("" if r["converged"] else " (not converged)")
            row.append(f"[bold]{text}[/]" if (exclude, k) == (o["exclude"], o["depth_offset"]) else text)
        table.add_row(*row)
    return table
