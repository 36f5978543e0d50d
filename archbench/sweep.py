"""``archbench eval``: a depth sweep of one block on one task, then the evaluators.

spec (block, task, depths, seeds, preset, --set overrides)
  -> for each (depth, seed): build, train, evaluate, write a run record (cached by hash)
  -> sweep evaluators (alpha_ell) -> result JSON and plots
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import itertools
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn)
from rich.text import Text

import archbench
from archbench.env import environment, resolve_device
from archbench.errors import ArchbenchError, UsageError, unknown
from archbench.evaluator import variant_label
from archbench.knobs import knobs_of, resolve
from archbench.model import Stack, StreamModel, build_model, check_stream_shapes
from archbench.records import RunStore, atomic_write_text, run_key
from archbench.registry import BLOCKS, EVALUATORS, TASKS, Entry
from archbench.train import TrainConfig, train

SECTIONS = ("block", "task", "model", "train")
ENGINES = ("auto", "batched", "plain")


@dataclasses.dataclass
class ModelConfig:
    width: int = 32  # residual-stream dimension
    zero_head: bool = True  # zero-initialised readout: every model starts at the uniform prediction


@dataclasses.dataclass
class EvalSpec:
    block: str = "residual-mlp"
    task: str = "teacher-student"
    preset: str = "quick"
    depths: list[int] | None = None  # None: the preset's
    recurrence: list[int] | None = None  # recurrent blocks: iteration counts, turned into effective depths
    seeds: int | None = None
    sets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # section -> key -> raw value
    evaluators: list[str] | None = None  # None: the task's default evaluators
    device: str = "auto"
    runs_dir: str = "runs"
    out: str | None = None
    plots: bool = True  # evaluators' figures beside the result JSON (a search turns them off)
    # auto: train the sweep's runs together (archbench.batched) where that is exact, else one by one;
    # batched: insist (an error says why not); plain: the reference loop, one run after another
    engine: str = "auto"


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """``["task.teacher=tied", "train.lr=1e-3"]`` -> ``{"task": {"teacher": "tied"}, "train": {"lr": "1e-3"}}``.

    A value ``a,b,c`` sweeps the knob over those values (see ``resolve_config``)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not section or not name:
            raise UsageError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. task.temperature=0.1")
        out.setdefault(section, {})[name] = value
    return out


def resolve_config(spec: EvalSpec) -> dict:
    """Knob defaults < the task's preset < --set overrides < --depths/--seeds.

    ``--set task.k=1,2,4`` makes a grid: ``config["grid"]`` maps "task.k" to [1, 2, 4], the section
    holds the first value, and the sweep runs every depth and seed at every grid point (a variant).
    """
    block, task = BLOCKS.get(spec.block), TASKS.get(spec.task)
    names = spec.evaluators if spec.evaluators is not None else list(task.obj.default_evaluators)
    names = with_requirements(names)
    evaluators = {name: EVALUATORS.get(name) for name in names}
    for e in evaluators.values():
        e.obj.check_task(task)
    presets = task.obj.presets
    if spec.preset not in presets:
        raise unknown(f"preset for task {spec.task!r}", spec.preset, presets)
    preset = copy.deepcopy(presets[spec.preset])
    for section in spec.sets:
        if section not in SECTIONS and section not in evaluators:
            raise unknown("--set section", section, [*SECTIONS, *evaluators])
    targets = {"block": block.obj, "task": task.obj, "model": ModelConfig, "train": TrainConfig,
               **{name: e.obj for name, e in evaluators.items()}}
    config: dict[str, Any] = {"preset": spec.preset, "evaluators": names}
    grid: dict[str, list] = {}
    for section, target in targets.items():
        suggested = preset.get(section, {})
        if section == "block":  # a preset suggests block knobs (e.g. attention=false on vectors) to blocks that have them
            suggested = {k: v for k, v in suggested.items() if k in knobs_of(target)}
        merged = {**suggested, **spec.sets.get(section, {})}
        config[section] = resolve(target, section, merged, grid if section in SECTIONS else None)
    depths = spec.depths if spec.depths is not None else preset.get("depths", [2, 4, 8])
    if spec.recurrence is not None:
        depths = recurrence_depths(block, config["block"], spec.recurrence)
    seeds = spec.seeds if spec.seeds is not None else preset.get("seeds", 1)
    if not depths or any(d < 1 for d in depths):
        raise UsageError(f"--depths {','.join(map(str, depths))}: depths must be positive integers")
    if seeds < 1:
        raise UsageError(f"--seeds {seeds}: need at least one seed")
    config["grid"] = grid
    if isinstance(block.obj, type) and issubclass(block.obj, Stack):  # fail before any training
        for _, c in variants(config):
            for d in depths:
                block.obj.check_depth(d, c["block"])
    config["depths"], config["seeds"] = sorted(set(depths)), seeds
    return config


def with_requirements(names: list[str]) -> list[str]:
    """``names`` plus the evaluators they read results from (``requires``), those first."""
    out: list[str] = []
    for name in names:
        for req in getattr(EVALUATORS.get(name).obj, "requires", ()):
            if req not in out:
                out.append(req)
        if name not in out:
            out.append(name)
    return out


def variants(config: dict) -> list[tuple[dict, dict]]:
    """(vary, config) for every grid point: ``vary`` maps "section.knob" to its value there."""
    keys, out = list(config.get("grid", {})), []
    for values in itertools.product(*config.get("grid", {}).values()):
        vary, c = dict(zip(keys, values)), copy.deepcopy(config)
        for key, value in vary.items():
            section, name = key.split(".", 1)
            c[section][name] = value
        out.append((vary, c))
    return out



def recurrence_depths(block: Entry, knobs: dict, recurrence: list[int]) -> list[int]:
    """Effective depths of a recurrent block at these iteration counts (same parameters throughout)."""
    depth_for = getattr(block.obj, "depth_for", None)
    if depth_for is None:
        recurrent = [e.name for e in BLOCKS.entries() if hasattr(e.obj, "depth_for")]
        raise UsageError(f"--recurrence: block {block.name!r} has no recurrence; use --depths "
                         f"(recurrent blocks: {', '.join(recurrent)})")
    if not recurrence or any(r < 1 for r in recurrence):
        raise UsageError(f"--recurrence {','.join(map(str, recurrence))}: iteration counts must be positive integers")
    return [depth_for(r, knobs) for r in recurrence]


def make_task(entry: Entry, cfg: dict, device: torch.device):
    try:
        return entry.obj(device=device, **cfg)
    except ArchbenchError:
        raise
    except Exception as e:
        raise ArchbenchError(f"task {entry.name!r} could not be built with {cfg}: {type(e).__name__}: {e}") from None


def make_model(block: Entry, config: dict, depth: int, task) -> StreamModel:
    m = config["model"]
    return build_model(block.obj, config["block"], depth, task.input, m["width"], m["zero_head"], block.name)


def run_determinants(block: Entry, task: Entry, config: dict, depth: int, seed: int) -> dict:
    return {"archbench": archbench.__version__, "block": block.name, "block_source": block.source_hash,
            "block_cfg": config["block"], "task": task.name, "task_source": task.source_hash,
            "task_cfg": config["task"], "model": config["model"], "train": config["train"], "depth": depth,
            "seed": seed}


def run_eval(spec: EvalSpec, console=None, on_run=None) -> dict:
    """Train (or find cached) every run of the sweep, then run the evaluators; returns the result dict.

    ``on_run(runs, task)`` is called after each run with the runs so far (a search reports
    intermediate values from it, and may stop the sweep by raising)."""
    console = console or Console(stderr=True)
    if spec.engine not in ENGINES:
        raise unknown("engine", spec.engine, ENGINES)
    config = resolve_config(spec)
    device = resolve_device(spec.device)
    block, task_entry = BLOCKS.get(spec.block), TASKS.get(spec.task)
    evaluators = {name: EVALUATORS.get(name).obj(**config[name]) for name in config["evaluators"]}
    store = RunStore(spec.runs_dir)
    env = environment(device)
    train_cfg = TrainConfig(**config["train"])
    grid = variants(config)
    tasks: dict[str, Any] = {}  # one task object per distinct task config

    def task_for(c):
        key = run_key(c["task"])
        if key not in tasks:
            tasks[key] = make_task(task_entry, c["task"], device)
        return tasks[key]

    jobs = [(vary, c, d, s) for vary, c in grid for d in config["depths"] for s in range(config["seeds"])]
    runs = []
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), SpeedColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        fresh = {} if spec.engine == "plain" else _train_together(
            jobs, block, task_entry, task_for, store, env, progress, console, strict=spec.engine == "batched")
        sweep_bar = progress.add_task("sweep", total=len(jobs), info="")
        for vary, c, depth, seed in jobs:
            task = task_for(c)
            det = run_determinants(block, task_entry, c, depth, seed)
            key = run_key(det)
            record = store.load(key)
            cached, model = record is not None and key not in fresh, fresh.get(key)
            where = (variant_label(vary) + ", " if vary else "") + f"depth {depth} seed {seed}"
            if key in fresh:
                console.print(_run_line(record, where))
            if record is None:
                bar = progress.add_task(where, total=train_cfg.steps, info="")

                def on_log(step, loss, bar=bar):
                    progress.update(bar, completed=step, info=f"loss {loss:.4g}")

                record, model = _train_one(block, task_entry, task, c, train_cfg, det, key, store, env, on_log)
                progress.remove_task(bar)
                console.print(_run_line(record, where))
            record = _model_evaluators(record, model, evaluators, store, block, c, task)
            runs.append({**{k: record[k] for k in ("depth", "effective_depth", "seed", "final_loss", "params",
                                                   "status", "wall_s", "key", "metrics", "eval")},
                         "solved": record.get("solved"), "vary": vary, "failure": record.get("failure"),
                         "cached": cached})
            progress.advance(sweep_bar)
            if on_run is not None:
                on_run(runs, task)

    out = Path(spec.out) if spec.out else (Path(spec.runs_dir) / "results" /
                                           f"{spec.block}__{spec.task}__{run_key(config)[:8]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics, plots = {}, []

    def models(run):  # for sweep evaluators that compare trained models (layer-correspondence)
        c = next(c for vary, c in grid if vary == run["vary"])
        return load_model(store, block, c, run, task_for(c))

    def sweep(ev, rs, task):
        return ev.evaluate_sweep(rs, task, models) if ev.needs_models else ev.evaluate_sweep(rs, task)

    def plot(name, ev, res, rs, suffix=""):
        if spec.plots and ev.plot(res, rs, path := out.with_suffix(f".{name}{suffix}.png")):
            plots.append(str(path))

    for name, ev in evaluators.items():
        if ev.kind == "model":
            metrics[name] = {"per_run": {r["key"]: r["metrics"].get(name) for r in runs}}
            plot(name, ev, metrics[name], runs)
        elif ev.across_variants or len(grid) == 1:
            metrics[name] = sweep(ev, runs, task_for(grid[0][1]) if len(grid) == 1 else None)
            plot(name, ev, metrics[name], runs)
        else:  # a per-variant sweep evaluator (alpha_ell): once per grid point, with that point's task
            metrics[name] = {"variants": []}
            for vary, c in grid:
                rs = [r for r in runs if r["vary"] == vary]
                res = {"vary": vary, **sweep(ev, rs, task_for(c))}
                metrics[name]["variants"].append(res)
                plot(name, ev, res, rs, "." + variant_label(vary).replace(", ", "_").replace("=", "-"))
    alpha = metrics.get("alpha-ell", {})
    result = {"block": spec.block, "task": spec.task, "config": config, "runs": runs,
              "alpha_ell": {"value": alpha.get("value"), "ci95": alpha.get("ci95")}, "metrics": metrics,
              "env": env, "command": sys.argv, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "files": {"result": str(out), "plots": plots}}
    atomic_write_text(out, json.dumps(result, indent=1, default=str))
    return result


def _new_model(block, config, depth, seed, task) -> StreamModel:
    """The model a run starts from: the same for a given seed, whichever engine trains it."""
    torch.manual_seed(seed)
    model = make_model(block, config, depth, task).to(task.device)
    probe = task.batch(2, torch.Generator(device=task.device).manual_seed(seed + 7919))[0]
    check_stream_shapes(model, probe, block.name)
    return model


def _train_one(block, task_entry, task, config, train_cfg, det, key, store, env, on_log):
    model = _new_model(block, config, det["depth"], det["seed"], task)
    ckpt = store.checkpoint_path(key)
    outcome = train(model, task, train_cfg, seed=det["seed"], depth=det["depth"], checkpoint=ckpt, on_log=on_log)
    record = _save_run(block, task_entry, task, model, outcome, det, key, store, env, {"name": "plain"})
    ckpt.unlink(missing_ok=True)
    return record, model


def _save_run(block, task_entry, task, model, outcome, det, key, store, env, engine) -> dict:
    record = {"key": key, "spec": det, "block": block.name, "task": task_entry.name, "depth": det["depth"],
              "effective_depth": model.effective_depth, "seed": det["seed"], "status": outcome.status,
              "final_loss": outcome.final_loss, "eval": outcome.metrics, "failure": outcome.failure,
              "steps_done": outcome.steps_done, "history": outcome.history, "wall_s": round(outcome.train_s, 3),
              "solved": task.solved(outcome.metrics) if outcome.status == "ok" else False,
              "params": sum(p.numel() for p in model.parameters()), "metrics": {}, "env": env, "engine": engine,
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    torch.save(model.state_dict(), store.weights_path(key))
    store.save(record)
    return record


def _train_together(jobs, block, task_entry, task_for, store, env, progress, console, strict) -> dict:
    """Train the sweep's uncached runs with the batched engine, one batch per training budget;
    returns {key: trained model}. Runs it cannot batch are left to the plain loop (with a note why)."""
    from archbench.batched import Job, NotBatchable, train_batched

    budgets: dict[str, list] = {}
    for vary, c, depth, seed in jobs:
        det = run_determinants(block, task_entry, c, depth, seed)
        key = run_key(det)
        if store.load(key) is None:
            budget = run_key({k: v for k, v in c["train"].items() if k != "lr"})  # lr differences are grouped
            budgets.setdefault(budget, []).append((c, det, key))
    fresh = {}
    for todo in budgets.values():
        if len(todo) < 2:
            continue
        batch = []
        for c, det, key in todo:
            task = task_for(c)
            batch.append(Job(_new_model(block, c, det["depth"], det["seed"], task), task, TrainConfig(**c["train"]),
                             det["seed"], det["depth"], shape=run_key([c["block"], c["model"], det["depth"]])))
        ckpt = store.checkpoint_path("batch-" + run_key(sorted(key for _, _, key in todo)))
        steps = batch[0].cfg.steps
        bar = progress.add_task(f"{len(batch)} runs together", total=steps, info="")

        def on_log(step, losses, bar=bar):
            finite = [v for v in losses if math.isfinite(v)]
            info = f"loss {min(finite):.3g}-{max(finite):.3g}" if finite else "no finite loss"
            progress.update(bar, completed=step, info=info)

        try:
            outcomes = train_batched(batch, ckpt, on_log)
        except NotBatchable as e:
            progress.remove_task(bar)
            if strict:
                raise UsageError(f"--engine batched: these runs cannot be trained together: {e}; "
                                 f"use --engine plain") from None
            console.print(f"[dim]training one run at a time: {e}[/]")
            continue
        progress.remove_task(bar)
        wall = round(sum(o.train_s for o in outcomes), 3)
        for (c, det, key), job, outcome in zip(todo, batch, outcomes):
            _save_run(block, task_entry, job.task, job.model, outcome, det, key, store, env,
                      {"name": "batched", "runs": len(batch), "wall_s": wall})
            fresh[key] = job.model
        ckpt.unlink(missing_ok=True)
    return fresh


def _model_evaluators(record, model, evaluators, store, block, config, task) -> dict:
    """Run the per-model evaluators a record lacks; ``model`` is None for a cached run (weights reloaded)."""
    # a result is reused only if it was measured with the same knobs
    todo = [n for n, ev in evaluators.items()
            if ev.kind == "model" and record["metrics"].get(n, {}).get("knobs") != config[n]]
    if not todo or record["status"] != "ok":
        return record
    if model is None:
        model = load_model(store, block, config, record, task, why=", ".join(todo))
        if model is None:
            return record
    model.eval()
    for name in todo:
        record["metrics"][name] = {**evaluators[name].evaluate_model(model, task), "knobs": config[name]}
    store.save(record)
    return record


def load_model(store: RunStore, block: Entry, config: dict, run: dict, task, why: str = "") -> StreamModel | None:
    """A finished run's trained model from its saved weights (None, with a warning, if they are gone)."""
    weights = store.weights_path(run["key"])
    if not weights.exists():
        warnings.warn(f"run {run['key']} has no saved weights; skipping {why or 'it'}")
        return None
    model = make_model(block, config, run["depth"], task).to(task.device)
    model.load_state_dict(torch.load(weights, map_location=task.device, weights_only=True))
    return model.eval()


class SpeedColumn(ProgressColumn):
    """Training steps per second (left blank on the sweep bar, whose unit is runs)."""

    def render(self, task):
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} it/s" if speed and task.description != "sweep" else "")


def _run_line(r: dict, where: str) -> str:
    if r["status"] != "ok":
        return f"{where}: [red]failed[/] ({r['failure']})"
    solved = {True: "  solved", False: "  not solved", None: ""}[r.get("solved")]
    return f"{where}: loss {r['final_loss']:.5g}{solved}  ({r['wall_s']:.1f} s)"
