"""``archbench compare A.json B.json``: the difference in α_ℓ and in loss between two sweeps, with intervals."""

from __future__ import annotations

NAME = "compare"
HELP = ("is sweep A steeper than sweep B? The difference in alpha_ell and in loss at the deepest shared depth, "
        "with a 95-percent bootstrap interval over replicates (paired where both ran the same seeds and teachers)")


def add_arguments(p):
    p.add_argument("a", metavar="A.json", help="a result JSON written by `archbench eval --out`")
    p.add_argument("b", metavar="B.json", help="the result to compare it with")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--out", default=None, metavar="FILE.json", help="write the comparison as JSON")


def run(args) -> int:
    from rich.console import Console

    from archbench.compare import compare
    from archbench.errors import UsageError
    from archbench.records import write_json

    if args.n_boot < 10:
        raise UsageError(f"--n-boot {args.n_boot}: need at least 10 resamples")
    result = compare(args.a, args.b, args.n_boot, args.seed)
    console = Console(highlight=False, soft_wrap=True)
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
