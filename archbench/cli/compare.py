"""``archbench compare A.json B.json``: the difference in α_ℓ and in loss between two sweeps, with intervals."""

from __future__ import annotations

NAME = "compare"
HELP = ("is sweep A steeper than sweep B? The difference in alpha_ell and in loss at the deepest shared depth, "
        "with a 95-percent bootstrap interval over replicates (paired where both ran the same seeds and teachers)")


def add_arguments(p):
    p.add_argument("a", metavar="A.json", help="a result JSON written by `archbench eval --out`")
    p.add_argument("b", metavar="B.json", help="the result to compare it with")
    p.add_argument("--metric", default=None, metavar="NAME",
                   help="compare this held-out metric instead (loss, accuracy, error_k4, ...): A's mean at one depth "
                        "against B's at one depth")
    p.add_argument("--depths", default=None, metavar="A_DEPTH,B_DEPTH",
                   help="with --metric: the depth of A and the depth of B to compare (default: the deepest both trained)")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the comparison as JSON")


def run(args) -> int:
    from rich.console import Console

    from archbench.compare import compare, compare_metric
    from archbench.errors import UsageError
    from archbench.records import write_json

    if args.n_boot < 10:
        raise UsageError(f"--n-boot {args.n_boot}: need at least 10 resamples")
    console = Console(highlight=False, soft_wrap=True)
    if args.depths is not None and args.metric is None:
        raise UsageError("--depths compares one metric at two depths: give --metric too (e.g. --metric loss)")
    if args.metric is not None:
        result = compare_metric(args.a, args.b, args.metric, _depths(args.depths), args.n_boot, args.seed)
        a, b = result["a"], result["b"]
        how = (f"paired over {a['replicates']} replicates" if result["paired"]
               else f"{a['replicates']} and {b['replicates']} replicates, resampled independently")
        console.print(f"A: {a['path']} ({a['block']}, depth {a['depth']}): {result['metric']} = {a['mean']:.4g}")
        console.print(f"B: {b['path']} ({b['block']}, depth {b['depth']}): {result['metric']} = {b['mean']:.4g}")
        console.print(f"A - B = {result['diff']:+.4g}{_ci(result['ci95'], '.3g')} ({how}): {result['verdict']}")
        if result.get("note"):
            console.print(result["note"])
        if args.out:
            write_json(args.out, result)
        return 0
    result = compare(args.a, args.b, args.n_boot, args.seed)
    console.print(f"A: {result['a']['path']} ({result['a']['block']} on {result['a']['task']})")
    console.print(f"B: {result['b']['path']} ({result['b']['block']} on {result['b']['task']})")
    if result["differs"]:
        console.print("differs in " + "; ".join(result["differs"]))
    for c in result["comparisons"]:
        reps = c["replicates"]
        how = (f"paired over {reps['a']} replicates" if reps["paired"]
               else f"{reps['a']} and {reps['b']} replicates, resampled independently")
        a, loss = c["alpha"], c["loss"]
        console.print(f"{c['a']} vs {c['b']} ({how}):")
        console.print(f"  alpha_ell: {a['a']:.3f} vs {a['b']:.3f}, A - B = {a['diff']:+.3f}{_ci(a['ci95'])}: {a['verdict']}")
        console.print(f"  loss at depth {loss['depth']}: {loss['a']:.4g} vs {loss['b']:.4g}, A - B = {loss['diff']:+.3g} "
                      f"({loss['relative']:+.1%}){_ci(loss['ci95'], '.3g')}: {loss['verdict']}")
        if c.get("note"):
            console.print(f"  {c['note']}")
    if args.out:
        write_json(args.out, result)
    return 0


def _ci(ci, fmt=".3f") -> str:
    return f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else ""


def _depths(text: str | None) -> tuple[int, int] | None:
    from archbench.errors import UsageError

    if text is None:
        return None
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--depths {text!r}: give two depths, A's then B's, e.g. --depths 4,2")
    return int(parts[0]), int(parts[1])
