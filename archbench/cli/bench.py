"""``archbench bench``: the batched engine against the plain loop, tokens/s and FLOP/s, peak memory."""

from __future__ import annotations

import json
from pathlib import Path

from archbench.errors import UsageError

NAME = "bench"
HELP = ("measure this machine: teacher-student sweep samples/s (batched engine vs plain loop), a sequence "
        "model's tokens/s and FLOP/s against the measured matmul rate, peak memory; writes a JSON record")
PARTS = ("sweep", "sequence")


def add_arguments(p):
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per measurement (default: 100)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)} (default: both)")
    p.add_argument("--sweep", choices=["quick", "paper"], default=None,
                   help="quick: 3 depths x 4 temperatures at the quick preset; paper: the paper's toy sweep, "
                        "6 depths x 16 temperatures x 3 teachers x 2 kinds at batch 1024 (default: quick on a "
                        "CPU, paper on a GPU)")
    p.add_argument("--out", default="bench.json", help="the JSON record (default: ./bench.json)")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from archbench.bench import BenchSpec, run_bench
    from archbench.errors import unknown
    from archbench.records import atomic_write_text

    parts = tuple(x for x in args.parts.split(",") if x)
    for part in parts:
        if part not in PARTS:
            raise unknown("--parts entry", part, PARTS)
    if args.steps is not None and args.steps < 5:
        raise UsageError(f"--steps {args.steps}: need at least 5 timed steps")
    err = Console(stderr=True, highlight=False)
    record = run_bench(BenchSpec(device=args.device, steps=args.steps, parts=parts, sweep=args.sweep), console=err)
    atomic_write_text(Path(args.out), json.dumps(record, indent=1, default=str))

    out = Console(highlight=False)
    out.print(f"{record['env']['device_name']}, torch {record['env']['torch']}, {record['machine']['cpu_cores']} cores")
    if "sweep" in record:
        s = record["sweep"]
        t = Table(title=f"sweep: {s['what']}")
        for col in ("engine", "students", "samples/s", "× plain", "peak memory"):
            t.add_column(col, justify="right" if col != "engine" else "left")
        mem = lambda r: next(f"{v:.2f} GiB" for k, v in r.items() if k.startswith("peak"))  # noqa: E731
        t.add_row("plain loop (one after another)", str(s["plain"]["students"]), f"{s['plain']['samples_per_s']:,.0f}",
                  "1.00", mem(s["plain"]))
        t.add_row("batched, one slice", str(s["batched_slice"]["students"]),
                  f"{s['batched_slice']['samples_per_s']:,.0f}", f"{s['speedup_slice']:.2f}", mem(s["batched_slice"]))
        t.add_row("batched, whole sweep", str(s["batched_sweep"]["students"]),
                  f"{s['batched_sweep']['samples_per_s']:,.0f}", f"{s['speedup']:.2f}", mem(s["batched_sweep"]))
        out.print(t)
        proj = s["projected"]
        out.print(f"the whole sweep at the preset's {proj['steps']:,} steps would take {proj['batched_h']:.2f} h "
                  f"batched, {proj['plain_h']:.2f} h with the plain loop (projected from these rates)")
    if "sequence" in record:
        q = record["sequence"]
        peak = q["matmul_peak"]
        out.print(f"sequence: {q['what']}: {q['tokens_per_s']:,.0f} tokens/s, "
                  f"{q['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s = {100 * q['fraction_of_matmul_peak']:.1f} % of the "
                  f"measured {peak['dtype']} matmul rate ({peak['flops_per_s'] / 1e9:,.1f} GFLOP/s at n={peak['n']}); "
                  f"peak memory {next(f'{v:.2f} GiB' for k, v in q.items() if k.startswith('peak'))}")
    out.print(f"record: {args.out}")
    return 0
