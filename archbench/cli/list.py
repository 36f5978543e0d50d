"""``archbench list blocks|tasks|evaluators [PATTERN]``: what is registered, with one line each."""

from __future__ import annotations

import sys

from archbench.errors import close_names, unknown

NAME = "list"
HELP = "list registered blocks, tasks or evaluators (wildcards allowed: 'residual*')"
TRAILING = "patterns"


def add_arguments(p):
    p.add_argument("kind", help="blocks, tasks or evaluators")
    p.add_argument("patterns", nargs="*", metavar="PATTERN", help="names or wildcards (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="also show each entry's knobs and defaults")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from archbench.registry import REGISTRIES

    kind = args.kind if args.kind.endswith("s") else args.kind + "s"
    if kind not in REGISTRIES:
        raise unknown("registry", args.kind, REGISTRIES)
    registry = REGISTRIES[kind]
    patterns = args.patterns or ["*"]
    entries = list({e.name: e for p in patterns for e in registry.entries(p)}.values())
    # piped into grep or a file: wide lines rather than descriptions wrapped mid-sentence
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    if not entries:
        names = [e.name for e in registry.entries()]
        close = sorted({c for p in patterns for c in close_names(p, names)})
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        print(f"archbench: no {kind} match {' '.join(patterns)!r}{hint}", file=sys.stderr)
        return 1
    table = Table(box=None, pad_edge=False)
    table.add_column(kind[:-1], style="bold")
    table.add_column("family")
    table.add_column("description")
    if args.verbose:
        table.add_column("knobs (default, range)")
    for e in entries:
        row = [e.name, e.family, e.description + (f"\n[dim]{e.citation}[/]" if e.citation else "")]
        if args.verbose:
            row.append("\n".join(_knob_line(k) for k in e.knobs.values()))
        table.add_row(*row)
    console.print(table)
    return 0


def _knob_line(k) -> str:
    rng = ""
    if k.range:
        rng = f" [{k.range.low:g}, {k.range.high:g}{', log' if k.range.log else ''}]"
    valid = f" ({k.bounds})" if k.bounds else ""
    return f"{k.name}: {k.describe_type()} = {k.default!r}{rng}{valid}"
