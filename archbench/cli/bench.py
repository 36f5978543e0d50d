"""``archbench bench``: the batched engine against the plain loop, tokens/s and FLOP/s, peak memory."""

from __future__ import annotations

import json
from pathlib import Path

from archbench.errors import UsageError

NAME = "bench"
HELP = ("measure this machine: teacher-student and sequence sweeps (plain loop, batched engine eager and compiled) "
        "in samples/s and FLOP/s against the measured matmul rate, the exp-9-3 projection, peak memory; writes a "
        "JSON record")
PARTS = ("sweep", "sequence", "sequence-sweep", "projection")  # archbench.bench.PARTS, without importing torch


def add_arguments(p):
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--steps", type=int, default=None,
                   help="timed training steps per measurement (default: 100)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)} (default: all)")
    p.add_argument("--sweep", choices=["quick", "paper"], default=None,
                   help="quick: 3 depths x 4 temperatures at the quick preset; paper: the paper's toy sweep, "
                        "6 depths x 16 temperatures x 3 teachers x 2 kinds at batch 1024 (default: quick on a "
                        "CPU, paper on a GPU)")
    p.add_argument("--compile", choices=["on", "off"], default="on",
                   help="also time the compiled batched engine, and project with it (default: on)")
    p.add_argument("--out", default="bench.json", help="the JSON record (default: ./bench.json)")


def _mem(row: dict) -> str:
    return next(f"{v:.2f} GiB" for k, v in row.items() if k.startswith("peak"))


def _table(title: str, rows: list[tuple[str, dict]], unit: str = "samples/s"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("engine", "models", unit, "× plain", "GFLOP/s", "% of matmul", "peak memory"):
        t.add_column(col, justify="right" if col != "engine" else "left")
    key = "tokens_per_s" if unit == "tokens/s" else "samples_per_s"
    for name, r in rows:
        t.add_row(name, str(r["students"]), f"{r[key]:,.0f}", f"{r['x_plain']:.2f}",
                  f"{r['achieved_flops_per_s'] / 1e9:,.1f}", f"{100 * r['fraction_of_matmul_peak']:.1f}", _mem(r))
    return t


def _peak(p: dict) -> str:
    return f"{p['dtype']} matmul rate measured in this run: {p['flops_per_s'] / 1e9:,.1f} GFLOP/s at n={p['n']}"


def run(args) -> int:
    from rich.console import Console

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
    record = run_bench(BenchSpec(device=args.device, steps=args.steps, parts=parts, sweep=args.sweep,
                                 compile=args.compile == "on"), console=err)
    atomic_write_text(Path(args.out), json.dumps(record, indent=1, default=str))

    out = Console(highlight=False)
    out.print(f"{record['env']['device_name']}, torch {record['env']['torch']}, {record['machine']['cpu_cores']} cores")
    if "sweep" in record:
        s = record["sweep"]
        rows = [("plain loop (one after another)", s["plain"])]
        for engine in ("batched", "compiled"):
            for part, what in (("slice", "one slice"), ("sweep", "whole sweep")):
                if f"{engine}_{part}" in s:
                    rows.append((f"{engine}, {what}", s[f"{engine}_{part}"]))
        out.print(_table(f"sweep: {s['what']}", rows))
        proj = s["projected"]
        out.print(f"{_peak(s['matmul_peak'])}; the whole sweep at the preset's {proj['steps']:,} steps would take "
                  f"{proj['best_h']:.2f} h with the fastest engine, {proj['plain_h']:.2f} h with the plain loop")
    if "sequence" in record:
        q = record["sequence"]
        out.print(f"sequence: {q['what']}: {q['tokens_per_s']:,.0f} tokens/s, "
                  f"{q['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s = {100 * q['fraction_of_matmul_peak']:.1f} % of the "
                  f"{_peak(q['matmul_peak'])}; peak memory {_mem(q)}")
    if "sequence_sweep" in record:
        q = record["sequence_sweep"]
        rows = [(name, q[key]) for key, name in (("plain", "plain loop (one seed, one after another)"),
                                                ("batched", "batched, all seeds"), ("compiled", "compiled, all seeds"))
                if key in q]
        out.print(_table(f"sequence sweep: {q['what']}", rows, unit="tokens/s"))
    if "projection" in record:
        p = record["projection"]
        out.print(f"projection: {p['what']}: {p['samples_per_s']:,.0f} samples/s, "
                  f"{p['achieved_flops_per_s'] / 1e9:,.1f} GFLOP/s = {100 * p['fraction_of_matmul_peak']:.1f} % of the "
                  f"{p['matmul_peak']['dtype']} matmul rate; {p['steps']:,} steps would take {p['projected_h']:.2f} h")
    out.print(f"record: {args.out}")
    return 0
