"""A search as a published table: the baseline and the best trials (the Pareto front), each with its
values at the search's budget and, once confirmed (``--confirm``), each objective against the
baseline's with the interval of the difference. Markdown to read, CSV and JSON for tools; the JSON
records the study's trial count as ``n_trials`` and every confirmation run's record key."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

from archbench.records import atomic_write_text
from archbench.search.study import SearchSpec


def study_table(spec: SearchSpec, summary: dict, confirmation: dict | None, command: str) -> dict:
    confirmed = {t["number"]: t for t in (confirmation or {}).get("trials", [])}
    base = summary["baseline"]
    rows = []
    for r in ([base] if base else []) + [b for b in summary["best"] if not b["baseline"]]:
        c = confirmed.get(r["number"])
        rows.append({"trial": r["number"], "baseline": r["baseline"], "block": r["block"], "knobs": r["knobs"],
                     "width": r["width"], "params": r["params"], "search": r["values"],
                     "confirmed": c["objectives"] if c else None, "also": c.get("also") if c else None,
                     "win": c["win"] if c else None,
                     "records": _keys(c["results"] if c else (confirmation or {}).get("baseline_results"))
                     if r["baseline"] or c else None,
                     "control": {**{k: v for k, v in c["control"].items() if k != "results"},
                                 "records": _keys(c["control"]["results"])} if c and c.get("control") else None})
    return {"study": summary["study"], "n_trials": summary["counted"], "distinct_complete": summary["distinct"],
            "states": summary["states"],
            "objectives": summary["objectives"], "directions": summary["directions"],
            "search": {"task": spec.task, "preset": spec.preset, "sets": spec.sets, "budget": spec.budget,
                       "baseline": spec.baseline, "seed": spec.seed, "space": spec.space},
            "train_s": round(summary["wall_s"], 1),
            "confirmation": {"seeds": confirmation["seeds"]} if confirmation else None,
            "command": command, "rows": rows}


def _keys(results: dict | None) -> dict | None:
    """{task: [record keys]} of a confirmation's result files."""
    if not results:
        return None
    return {task: [run["key"] for run in json.loads(Path(path).read_text())["runs"]] for task, path in results.items()}


def write_study_table(table: dict, out: Path) -> list[Path]:
    """``out/STUDY.md``, ``.csv`` and ``.json``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / table["study"]
    files = {stem.with_suffix(".json"): json.dumps(table, indent=1) + "\n",
             stem.with_suffix(".csv"): _csv(table), stem.with_suffix(".md"): _markdown(table)}
    for path, text in files.items():
        atomic_write_text(path, text)
    return list(files)


def _diff(v: dict | None) -> str:
    if not v or "diff" not in v:
        return "-"
    lo, hi = v["ci95"]
    return f"{v['diff']:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _verdict(row: dict) -> str:
    if row["baseline"]:
        return "baseline"
    if row["confirmed"] is None:
        return "not confirmed"
    out = "**beats the baseline**" if row["win"] else _verdicts(row["confirmed"])
    if row.get("control"):
        out += "; against its control: " + ("**beats it**" if row["control"]["win"] else
                                           _verdicts(row["control"]["objectives"]))
    return out


def _verdicts(objectives: dict) -> str:
    return "; ".join(f"{o}: {re.sub(' (from|than) (the baseline|its control)', '', v['verdict'])}"
                     for o, v in objectives.items())


def _knobs(row: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["knobs"].items()) or "defaults"


def _markdown(t: dict) -> str:
    objs = t["objectives"]
    seeds = (t["confirmation"] or {}).get("seeds")
    also = _also_keys(t)
    controls = any(r.get("control") for r in t["rows"])
    head = ["trial", "block", "knobs", "params", *[f"{o} (search)" for o in objs],
            *[f"{o}: trial − baseline [95 % CI]" for o in objs],
            *[f"{k.split('@')[1]}: trial − baseline [95 % CI]" for k in also],
            *([f"{o}: trial − control [95 % CI]" for o in objs] if controls else []), "verdict"]
    states = ", ".join(f"{n} {s.lower()}" for s, n in t["states"].items())
    directions = ", ".join(f"{o} ({d[:3]})" for o, d in zip(objs, t["directions"]))
    lines = [f"# Search `{t['study']}`", "",
             f"{t['n_trials']} trials ({states}; {t['distinct_complete']} distinct configurations among the "
             f"complete ones), objectives {directions}, "
             f"task {t['search']['task']} at preset `{t['search']['preset']}`, budget {t['search']['budget']}; "
             f"{t['train_s'] / 3600:.1f} h of training. Rows: the baseline and the "
             f"{'Pareto front' if len(objs) > 1 else 'best trials'}; "
             + (f"each re-run with {seeds} seeds at the preset's full budget and compared with the baseline "
                f"(paired bootstrap over seeds; a win is better on one objective beyond the noise and worse on none)"
                + ("; and with its control, the baseline block with the trial's settings that block has too "
                   "(act, gate, norm, MLP ratio, ...) at the same budget: what the block adds beyond those settings."
                   if controls else ".") if seeds else "not confirmed yet."), "",
             "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in t["rows"]:
        cells = [str(r["trial"]), f"`{r['block']}`", _knobs(r), f"{r['params']:,}" if r["params"] else "-",
                 *[f"{r['search'][o]:.4g}" if r["search"] else "-" for o in objs],
                 *[_diff((r["confirmed"] or {}).get(o)) for o in objs],
                 *[_diff((r["also"] or {}).get(k)) for k in also],
                 *([_diff(((r.get("control") or {}).get("objectives") or {}).get(o)) for o in objs] if controls else []),
                 _verdict(r)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Rebuild: `{t['command']}`", ""]
    return "\n".join(lines)


def _also_keys(t: dict) -> list[str]:
    """The comparisons reported beside the objectives (``compose@error_k8``), in order of first appearance."""
    return list(dict.fromkeys(k for r in t["rows"] for k in (r.get("also") or {})))


def _csv(t: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [*t["objectives"], *_also_keys(t)]
    ctl = [f"{o}_vs_control" for o in t["objectives"]]
    w.writerow(["trial", "baseline", "block", "knobs", "width", "params", *[f"{o}_search" for o in t["objectives"]],
                *[x for o in cols + ctl for x in (f"{o}_diff", f"{o}_ci_low", f"{o}_ci_high", f"{o}_verdict")],
                "win", "win_vs_control"])
    for r in t["rows"]:
        control = r.get("control") or {}
        conf = {**(r["confirmed"] or {}), **(r.get("also") or {}),
                **{f"{o}_vs_control": v for o, v in (control.get("objectives") or {}).items()}}
        w.writerow([r["trial"], r["baseline"], r["block"], json.dumps(r["knobs"]), r["width"], r["params"],
                    *[(r["search"] or {}).get(o) for o in t["objectives"]],
                    *[x for o in cols + ctl for x in ((conf.get(o) or {}).get("diff"),
                                                      *((conf.get(o) or {}).get("ci95") or (None, None)),
                                                      (conf.get(o) or {}).get("verdict"))],
                    r["win"], control.get("win")])
    return buf.getvalue()
