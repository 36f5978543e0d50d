"""Leaderboards: tables built from run records (and studies), never edited by hand.

Records are grouped into sweeps (everything that determines a run but its depth and seed); each
sweep is one row, with α_ℓ and the regime recomputed from its records by the same evaluators that
``archbench eval`` uses. Rows sharing a task configuration and a training budget form one table,
written as Markdown (for reading), CSV and JSON (for tools). A rebuild merges into the tables already
there: a row is replaced only by a newer build of the same sweep, so nothing already published is
lost. Records are validated on ingestion; a malformed or foreign file is reported and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

import archbench
from archbench.compare import compare_sides, level_verdict, mean_difference_ci, side_of_records
from archbench.config import ModelConfig
from archbench.errors import ArchbenchError, UsageError
from archbench.evaluators.alpha_ell import AlphaEll
from archbench.knobs import knobs_of, resolve
from archbench.records import NUMERICS_VERSION, RunRecord, RunStore, atomic_write_text, digest
from archbench.sweep import make_task

TABLE_VERSION = 2
_RENAMED_IN_2 = {"later_effect": "skip_effect_mean", "depth_score": "skip_centre"}  # row fields of version 1

COLUMNS = {
    "block": "registered block name",
    "config": "block knobs and model settings that differ from their defaults",
    "params": "trainable parameters at the largest depth",
    "depths": "effective depths trained (prelude + r·core + coda for recurrent blocks)",
    "seeds": "seeds per depth",
    "replicates": "replicates per depth (student seeds × teachers); the α_ℓ interval resamples them",
    "vs_baseline": "α_ℓ minus the baseline row's (the task's baseline block, at the fewest non-default settings), "
                   "with the bootstrap 95 % "
                   "interval of the difference over replicates (paired where both ran the same ones) and the verdict "
                   "of `archbench compare`",
    "loss_vs_baseline": "held-out loss at the deepest depth both rows trained, relative to the baseline row's "
                        "(-10 % = 10 % lower), with the bootstrap 95 % interval and verdict of `archbench compare`",
    "alpha": "α_ℓ: slope of log held-out loss against log effective depth (1 = ensemble averaging)",
    "alpha_ci95": "bootstrap 95 % interval of α_ℓ (none when the runs leave no freedom to resample)",
    "loss": "held-out loss at the largest depth (mean over seeds); where every run at that depth failed, at the "
            "largest depth that finished, which the cell names (`loss_depth` in CSV and JSON)",
    "depth_to_solve": "smallest effective depth whose runs solve the task (tasks with a notion of solved)",
    "headline": "the task's headline held-out metric at the largest depth, mean over replicates (tasks that have "
                "one; hop-induction: the error at the hardest k trained; word-problem: the accuracy at the "
                "worst position)",
    "headline_vs_baseline": "the headline metric minus the baseline row's at the deepest depth both trained, with "
                            "the bootstrap 95 % interval of the difference over replicates and its verdict",
    "phi_mid": "mean angle between neighbouring updates over the middle layers of the deepest model (rad; "
               "π/2 = uncorrelated, small = smooth)",
    "skip_effect_mean": "mean relative change of the later layers' updates when one layer is skipped (deepest model)",
    "skip_centre": "where along depth skipping matters most (0 = first layer, 1 = last)",
    "regime": "ensemble-averaging / compositional / procedural / undetermined (rule in `archbench list "
              "evaluators -v regime`)",
    "train_s": "training wall time of all the row's runs (s)",
    "device": "where the runs trained",
    "version": "archbench version and git commit of the runs",
    "source": "how the sweep was chosen: a named search trial, or blank for a listed eval",
    "id": "the sweep's id; the JSON lists its run records",
}


def load_records(runs_dirs: list[str | Path]) -> tuple[list[RunRecord], dict[str, str], list[str]]:
    """Every valid run record under ``RUNS_DIR/records``, the runs directory of each (by key), and one
    line per file skipped."""
    records, where, skipped = [], {}, []
    for d in runs_dirs:
        store = RunStore(d)
        if not store.dir.is_dir():
            skipped.append(f"{d}: no records folder")
            continue
        for path, record, why in store.scan():
            if record is None:
                skipped.append(f"{path}: {why}")
                continue
            records.append(record)
            where[record.key] = str(d)
    return records, where, skipped


def sweep_id(record: RunRecord) -> str:
    """Everything that determined a run but its depth and its replicate (seed, teacher): the runs of one table row."""
    return digest({k: v for k, v in without_teacher(record.spec).items() if k not in ("depth", "seed")})[:12]


def without_teacher(spec: dict) -> dict:
    """``spec`` without the task's teacher knob: a teacher is a replicate, like a seed, not part of what a row is."""
    from archbench.registry import TASKS

    if spec["task"] not in TASKS:
        return spec
    return {**spec, "task_cfg": task_settings(TASKS.get(spec["task"]).obj, spec["task_cfg"])}


def task_settings(task, cfg: dict) -> dict:
    """A task configuration without the knob that picks its teacher (``Task.teacher_knob``)."""
    knob = getattr(task, "teacher_knob", None)
    return {k: v for k, v in cfg.items() if k != knob}


def _diff(values: dict, defaults: dict) -> dict:
    return {k: v for k, v in values.items() if k in defaults and defaults[k] != v}


def table_identity(task_name: str, task_cfg: dict, train: dict) -> tuple[str, str | None, dict]:
    """(table name, preset, task knobs that differ from the preset's): one table per comparable budget."""
    from archbench.registry import TASKS
    from archbench.train import TrainConfig

    task = TASKS.get(task_name).obj

    presets = {name: (resolve(TrainConfig, "train", p.get("train", {})),
                      task_settings(task, resolve(task, "task", p.get("task", {}))))
               for name, p in task.presets.items()}
    # the preset whose training budget this is; else the one whose task settings these are; else the one
    # that differs in the fewest task and training settings (exp-9-3 at a cut budget on the other teacher)
    preset_name = next((n for n, (tr, _) in presets.items() if tr == train), None)
    near = preset_name or next((n for n, (_, tc) in presets.items() if tc == task_cfg), None)
    if near is None and presets:
        near = min(presets, key=lambda n: len(_diff(task_cfg, presets[n][1])) + len(_diff(train, presets[n][0])))
    diff = _diff(task_cfg, presets[near][1] if near else task_settings(task, resolve(task, "task", {})))
    name = task_name + "".join(f"__{k}-{v}" for k, v in diff.items())
    if near:
        name += f"__{near}"
    if not preset_name:
        name += "__train-" + digest(train)[:6]
    return name, preset_name, diff


def build_rows(records: list[RunRecord], studies: dict[str, list] | None = None, all_versions: bool = False,
               skipped: list[str] | None = None, notes: list[str] | None = None,
               where: dict[str, str] | None = None) -> dict[str, dict]:
    """Tables (name -> {meta, rows}) from records; ``studies`` maps a study name to its trials.

    A sweep trained at another ``version`` of its block or task, or of archbench's numerics, is left
    out with a line in ``skipped`` unless ``all_versions``: a table compares the code as it is. A row
    whose records were made by other source than today's at the same versions stays, with a line in
    ``notes``.
    """
    from archbench.registry import BLOCKS, TASKS

    by_sweep: dict[str, list[RunRecord]] = {}
    for r in records:
        by_sweep.setdefault(sweep_id(r), []).append(r)
    tables: dict[str, dict] = {}
    task_objects: dict[str, Any] = {}
    sides: dict[str, Any] = {}  # sweep id -> its runs as archbench.compare sees them
    headlines: dict[str, dict] = {}  # sweep id -> depth -> replicate -> the task's headline metric
    for sid, runs in sorted(by_sweep.items()):
        spec = runs[0].spec
        if spec["task"] not in TASKS or spec["block"] not in BLOCKS:
            kind = "task" if spec["task"] not in TASKS else "block"
            warnings.warn(f"skipping sweep {sid} ({len(runs)} records): {kind} {spec[kind]!r} is not registered "
                          f"here (pass its file with --plugins)")
            continue
        entries = {"block": BLOCKS.get(spec["block"]), "task": TASKS.get(spec["task"])}
        other = [f"{kind} {e.name!r} version {spec[f'{kind}_version']} (now {e.version})"
                 for kind, e in entries.items() if spec[f"{kind}_version"] != e.version]
        if spec["numerics"] != NUMERICS_VERSION:
            other.append(f"archbench numerics version {spec['numerics']} (now {NUMERICS_VERSION})")
        if other and not all_versions:
            if skipped is not None:
                skipped.append(f"sweep {sid} ({len(runs)} records): trained at {' and '.join(other)}; "
                               f"--all-versions keeps it")
            continue
        drift = sorted({kind for r in runs for kind, e in entries.items() if r.source.get(kind) != e.source_hash})
        if drift and notes is not None:
            notes.append(f"sweep {sid} ({spec['block']} on {spec['task']}): records made by other source of its "
                         f"{' and '.join(drift)} than today's, at the same version")
        name, preset, task_diff = table_identity(spec["task"], without_teacher(spec)["task_cfg"], spec["train"])
        tkey = digest(spec["task_cfg"])
        if tkey not in task_objects:
            import torch

            task_objects[tkey] = make_task(entries["task"], spec["task_cfg"], torch.device("cpu"))
        row = sweep_row(sid, runs, task_objects[tkey], entries["block"], entries["task"].obj.solve_metric is not None,
                        studies or {}, where or {})
        sides[sid] = side_of_records(spec["block"], runs, AlphaEll().floor_for(task_objects[tkey], len(row["depths"])))
        if row.get("headline_metric"):
            headlines[sid] = _by_depth(runs, row["headline_metric"])
        table = tables.setdefault(name, {"task": spec["task"], "task_cfg": without_teacher(spec)["task_cfg"],
                                         "task_diff": task_diff, "preset": preset, "train": spec["train"], "rows": {}})
        table["rows"][sid] = row
    for table in tables.values():
        against_baseline(table, sides, headlines)
    return tables


def _by_depth(runs: list[RunRecord], metric: str) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in runs:
        if r.ok and r.eval.get(metric) is not None:
            out.setdefault(r.effective_depth, {})[r.replicate] = float(r.eval[metric])
    return out


def against_baseline(table: dict, sides: dict, headlines: dict | None = None) -> None:
    """Each row's α_ℓ minus the baseline row's (the task's ``baseline_block``, at its defaults or as few
    changes as the table has), with the
    bootstrap interval of the difference over replicates and a verdict (``archbench compare``'s); the same
    for the task's headline metric at the deepest depth both rows trained, where it has one."""
    headlines = headlines or {}
    from archbench.registry import TASKS

    block = TASKS.get(table["task"]).obj.baseline_block
    # the baseline block at the fewest non-default settings (those its preset suggests, e.g. block.heads)
    candidates = sorted((len(row["config"]), sid) for sid, row in table["rows"].items() if row["block"] == block)
    base = candidates[0][1] if candidates else None
    for sid, row in table["rows"].items():
        row["vs_baseline"] = None
        if base is None or sid == base:
            continue
        try:
            c = compare_sides(sides[sid], sides[base], n_boot=1000)
        except (UsageError, ValueError):  # no shared depth, or a fit that cannot be made
            continue
        loss = c["loss"]
        row["vs_baseline"] = {"baseline": base, "alpha_diff": c["alpha"]["diff"], "ci95": c["alpha"]["ci95"],
                              "paired": c["replicates"]["paired"], "verdict": c["alpha"]["verdict"],
                              "loss_depth": loss["depth"], "loss_relative": loss["relative"],
                              # the interval of the difference, relative to the baseline's mean loss
                              "loss_ci95": [x / loss["b"] for x in loss["ci95"]] if loss["ci95"] else None,
                              "loss_verdict": loss["verdict"]}
        common = sorted(set(headlines.get(sid, {})) & set(headlines.get(base, {})))
        if common:
            a, b = headlines[sid][common[-1]], headlines[base][common[-1]]
            ci = mean_difference_ci(a, b, n_boot=1000)
            row["vs_baseline"].update({"headline_depth": common[-1], "headline_ci95": ci,
                                       "headline_diff": float(np.mean(list(a.values())) - np.mean(list(b.values()))),
                                       "headline_verdict": level_verdict(ci)})


def sweep_row(sid, runs: list[RunRecord], task, block, solvable: bool, studies: dict, where: dict) -> dict:
    """One table row: a sweep's records, re-evaluated by the sweep evaluators ``eval`` uses."""
    from archbench.registry import EVALUATORS

    spec = runs[0].spec
    runs = sorted(runs, key=lambda r: (r.effective_depth, r.seed))
    ok = [r for r in runs if r.ok]
    deepest = [r for r in ok if r.effective_depth == max(x.effective_depth for x in ok)] if ok else []
    alpha = EVALUATORS.get("alpha-ell").obj().evaluate_sweep(runs, task)
    regime = EVALUATORS.get("regime").obj().evaluate_sweep(runs, task)
    ev = regime["evidence"]
    has_evidence = ev.get("phi_mid") is not None and ev.get("skip_effect_mean") is not None
    defaults = {k: kn.default for k, kn in knobs_of(block.obj).items()}
    model_defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    config = {**_diff(spec["block_cfg"], defaults), **_diff(spec["model"], model_defaults)}
    if "width" in config:
        config["width"] = config.pop("width")
    row = {"id": sid, "block": spec["block"], "config": config,
           "params": max((r.params for r in runs), default=None),
           "depths": sorted({r.effective_depth for r in runs}), "seeds": len({r.seed for r in runs}),
           "replicates": len({r.replicate for r in runs}),
           "alpha": alpha.get("value"), "alpha_ci95": alpha.get("ci95"),
           "loss": _mean([r.final_loss for r in deepest]),
           "loss_depth": deepest[0].effective_depth if deepest else None,  # below the largest when those failed
           "depth_to_solve": None, "phi_mid": ev.get("phi_mid"), "skip_effect_mean": ev.get("skip_effect_mean"),
           "skip_centre": ev.get("skip_centre_relative"),
           "regime": regime["regime"] if has_evidence else None,
           "failed_runs": len(runs) - len(ok),
           "train_s": round(sum(r.wall_s for r in runs), 1),
           "device": sorted({_device(r.env) for r in runs}),
           "version": sorted({f"{r.source.get('archbench')}@{_short(r.env.get('git_commit'))}" for r in runs}),
           "source": _source(spec, studies), "records": [r.key for r in runs],
           "runs_dirs": sorted({where[r.key] for r in runs if r.key in where}),
           "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    metric = task.headline_metric() if task is not None else None
    if metric:
        row["headline_metric"] = metric
        row["headline"] = _mean([r.eval.get(metric) for r in deepest if r.eval.get(metric) is not None])
    if solvable:
        d2s = EVALUATORS.get("depth-to-solve").obj().evaluate_sweep(runs, task)["difficulties"]
        row["depth_to_solve"] = d2s[0]["depth_to_solve"] if d2s else None
    return row


def _short(commit: str | None) -> str:
    if not commit:
        return "unknown"
    sha, _, dirty = commit.partition("+")
    return sha[:12] + (f"+{dirty}" if dirty else "")


def _device(env: dict) -> str:
    dev = env.get("device", "?")
    return env.get("device_name", dev) if dev.startswith("cuda") else "cpu"


def _source(spec: dict, studies: dict) -> str:
    """The search trials whose sampled block configuration and width this sweep has."""
    hits = []
    for name, trials in studies.items():
        for t in trials:
            ev = t.get("eval") or {}
            if ev.get("block") != spec["block"]:
                continue
            knobs = ev.get("sets", {}).get("block", {})
            width = ev.get("sets", {}).get("model", {}).get("width")
            if all(spec["block_cfg"].get(k) == v for k, v in knobs.items()) and \
                    (width is None or spec["model"].get("width") == width):
                hits.append(f"search {name} #{t['number']}")
    return ", ".join(hits[:3]) + (f" (+{len(hits) - 3})" if len(hits) > 3 else "")


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


# ------------------------------------------------------------------------------------------------ writing

def load_table(path: Path) -> dict | None:
    """An existing table's JSON (None if there is none); refuses to touch a file that is not one."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArchbenchError(f"{path} exists but is not readable JSON ({type(e).__name__}); move it away or fix "
                             f"it: nothing was written") from None
    if isinstance(data, dict) and data.get("table_version") == 1 and isinstance(data.get("rows"), list):
        data["rows"] = [{_RENAMED_IN_2.get(k, k): v for k, v in row.items()} for row in data["rows"]]
        data["table_version"] = TABLE_VERSION
    if not isinstance(data, dict) or data.get("table_version") != TABLE_VERSION or not isinstance(data.get("rows"), list):
        raise ArchbenchError(f"{path} exists but is not an archbench leaderboard table (v{TABLE_VERSION}); move it "
                             f"away: nothing was written")
    return data


def write_tables(tables: dict[str, dict], out: Path, command: str) -> list[Path]:
    """Merge each table into ``out/NAME.json`` (rows kept unless rebuilt) and write .md/.csv/.json."""
    out.mkdir(parents=True, exist_ok=True)
    olds = {name: load_table(out / f"{name}.json") for name in tables}  # fail before writing anything
    written = []
    for name, table in sorted(tables.items()):
        old = olds[name]
        rows = {r["id"]: r for r in (old or {}).get("rows", [])}
        rows.update(table["rows"])
        ordered = sorted(rows.values(), key=lambda r: (r["alpha"] is None, -(r["alpha"] or 0), r["block"]))
        doc = {"table_version": TABLE_VERSION, "table": name, "task": table["task"], "task_cfg": table["task_cfg"],
               "preset": table["preset"], "train": table["train"], "built_by": command,
               "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "archbench": archbench.__version__, "columns": COLUMNS, "rows": ordered}
        solvable = any(r.get("depth_to_solve") is not None for r in ordered)
        atomic_write_text(out / f"{name}.json", json.dumps(doc, indent=1, default=str))
        atomic_write_text(out / f"{name}.csv", to_csv(ordered))
        atomic_write_text(out / f"{name}.md", to_markdown(doc, solvable))
        written += [out / f"{name}.{ext}" for ext in ("md", "csv", "json")]
    return written


_CSV = ["id", "block", "config", "params", "depths", "seeds", "replicates", "alpha", "alpha_lo", "alpha_hi",
        "alpha_vs_baseline", "alpha_vs_baseline_lo", "alpha_vs_baseline_hi", "vs_baseline_verdict",
        "loss_vs_baseline", "loss_vs_baseline_lo", "loss_vs_baseline_hi", "loss_vs_baseline_verdict", "loss",
        "headline_metric", "headline", "headline_vs_baseline", "headline_vs_baseline_lo", "headline_vs_baseline_hi",
        "headline_vs_baseline_verdict",
        "loss_depth", "depth_to_solve", "phi_mid", "skip_effect_mean", "skip_centre", "regime", "failed_runs", "train_s", "device",
        "version", "source", "records"]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV, lineterminator="\n")
    w.writeheader()
    for r in rows:
        ci = r.get("alpha_ci95") or [None, None]
        vs = r.get("vs_baseline") or {}
        vs_ci = vs.get("ci95") or [None, None]
        loss_ci = vs.get("loss_ci95") or [None, None]
        w.writerow({**{k: r.get(k) for k in _CSV if k in r}, "alpha_lo": ci[0], "alpha_hi": ci[1],
                    "alpha_vs_baseline": vs.get("alpha_diff"), "alpha_vs_baseline_lo": vs_ci[0],
                    "alpha_vs_baseline_hi": vs_ci[1], "vs_baseline_verdict": vs.get("verdict"),
                    "loss_vs_baseline": vs.get("loss_relative"), "loss_vs_baseline_lo": loss_ci[0],
                    "loss_vs_baseline_hi": loss_ci[1], "loss_vs_baseline_verdict": vs.get("loss_verdict"),
                    "headline_vs_baseline": vs.get("headline_diff"),
                    "headline_vs_baseline_lo": (vs.get("headline_ci95") or [None, None])[0],
                    "headline_vs_baseline_hi": (vs.get("headline_ci95") or [None, None])[1],
                    "headline_vs_baseline_verdict": vs.get("headline_verdict"),
                    "config": " ".join(f"{k}={v}" for k, v in r["config"].items()),
                    "depths": ";".join(map(str, r["depths"])), "device": ";".join(r["device"]),
                    "version": ";".join(r["version"]), "records": ";".join(r["records"])})
    return buf.getvalue()


def _f(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _row_verdict(verdict: str) -> str:  # compare's A and B are the row and the table's baseline row
    return verdict.replace("A is", "the row is").replace("B is", "the baseline is")


def to_markdown(doc: dict, solvable: bool) -> str:
    rows = doc["rows"]
    train = ", ".join(f"{k}={v}" for k, v in doc["train"].items())
    task = ", ".join(f"{k}={v}" for k, v in doc["task_cfg"].items())
    replicates = sorted({r["replicates"] for r in rows})
    lines = [f"# {doc['table']}", "",
             f"Built by `{doc['built_by']}` on {doc['built'][:10]} from the run records of {len(rows)} sweeps "
             f"({sum(len(r['records']) for r in rows)} runs); generated, do not edit by hand.", "",
             f"- task: **{doc['task']}** ({task})",
             f"- preset: **{doc['preset'] or 'custom'}**; training: {train}",
             f"- replicates per depth (student seeds × teachers): {', '.join(map(str, replicates))}; every row's runs, config, versions and device are in "
             f"`{doc['table']}.json` (row id → `records`, each a run record under the runs directory)", ""]
    headline = next((r["headline_metric"] for r in rows if r.get("headline_metric")), None)
    cols = ["block", "config", "params", "depths", "α_ℓ [95 % CI]", "Δα_ℓ vs baseline [95 % CI]", "loss",
                                                                                   "Δloss vs baseline [95 % CI]"] + \
           [headline, f"Δ{headline} vs baseline [95 % CI]"] * bool(headline) + \
           ["depth to solve"] * solvable + \
           ["φ_mid", "skip effect (mean)", "skip centre", "regime", "train s", "device", "version", "source", "id"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        ci = r.get("alpha_ci95")
        alpha = _f(r["alpha"]) + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else "")
        vs = r.get("vs_baseline")
        versus = "–" if not vs else f"{vs['alpha_diff']:+.3g}" + (
            f" [{vs['ci95'][0]:+.3g}, {vs['ci95'][1]:+.3g}]: {_row_verdict(vs['verdict'])}" if vs["ci95"]
            else ": no interval")
        loss_ci = (vs or {}).get("loss_ci95")
        loss_versus = "–" if not vs or "loss_relative" not in vs else f"{vs['loss_relative']:+.1%}" + (
            f" [{loss_ci[0]:+.1%}, {loss_ci[1]:+.1%}]: {_row_verdict(vs['loss_verdict'])}" if loss_ci
            else ": no interval")
        cells = [r["block"], " ".join(f"{k}={_f(v)}" for k, v in r["config"].items()) or "defaults",
                 f"{r['params']:,}" if r["params"] else "–", ",".join(map(str, r["depths"])), alpha, versus,
                 _f(r["loss"], 4) + (f" (depth {r['loss_depth']}: deeper runs failed)"
                                     if r.get("loss_depth") not in (None, max(r["depths"])) else ""),
                 loss_versus]
        if headline:
            ci = (vs or {}).get("headline_ci95")
            cells += [_f(r.get("headline")),
                      "–" if not vs or "headline_diff" not in vs else f"{vs['headline_diff']:+.3g}" + (
                          f" [{ci[0]:+.3g}, {ci[1]:+.3g}]: {_row_verdict(vs['headline_verdict'])}" if ci
                          else ": no interval")]
        if solvable:
            cells.append(_f(r.get("depth_to_solve")) if r.get("depth_to_solve") is not None else "not solved")
        cells += [_f(r["phi_mid"]), _f(r["skip_effect_mean"]), _f(r["skip_centre"]), r["regime"] or "–",
                  f"{r['train_s']:.0f}", ", ".join(r["device"]), ", ".join(r["version"]), r["source"] or "",
                  r["id"]]
        if r.get("failed_runs"):
            cells[0] += f" ({r['failed_runs']} failed run(s))"
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Columns:", ""]
    for key, text in COLUMNS.items():
        if (key == "depth_to_solve" and not solvable) or (key.startswith("headline") and not headline):
            continue
        lines.append(f"- **{key}**: {text}")
    return "\n".join(lines) + "\n"


def build(runs_dirs: list[str], out: str, studies: list[str], storage: str | None, task: str | None,
          command: str | None = None, all_versions: bool = False,
          trials: dict[str, list[dict]] | None = None) -> tuple[list[Path], list[str], list[str], int]:
    """Build the tables; returns (files written, files and sweeps skipped with the reason, notes on rows
    made by other source than today's, records used). ``studies`` are read from ``storage``; ``trials``
    gives more, already read (study name -> [{"number", "eval"}], as ``leaderboards/studies`` keeps them)."""
    records, where, skipped = load_records(runs_dirs)
    if task:
        records = [r for r in records if r.task == task]
    trials = dict(trials or {})
    if studies:
        import optuna

        from archbench.search import open_storage

        url = storage or f"sqlite:///{Path(runs_dirs[0]).resolve() / 'studies.db'}"
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():  # read, never create
            from archbench.errors import UsageError

            raise UsageError(f"--study {studies[0]}: no studies database at {url[len('sqlite:///'):]}; "
                             f"give the search's --runs-dir or --storage")
        st = open_storage(url, heartbeat=False)
        for name in studies:
            try:
                done = optuna.load_study(study_name=name, storage=st).get_trials(
                    deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                trials[name] = [{"number": t.number, "eval": t.user_attrs.get("eval", {})} for t in done]
            except KeyError:
                from archbench.errors import unknown

                raise unknown(f"study in {url}", name, optuna.get_all_study_names(st)) from None
    notes: list[str] = []
    tables = build_rows(records, trials, all_versions, skipped, notes, where)
    files = write_tables(tables, Path(out), command or "archbench " + " ".join(sys.argv[1:]))
    return files, skipped, notes, len(records)
