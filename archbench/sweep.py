"""``archbench eval``: a depth sweep of one block on one task, then the evaluators.

    spec -> Config (archbench.config) -> for each (grid point, depth, seed): find its record, or build,
    train (several runs together where exact: archbench.batched), evaluate and write one
    -> per-model evaluators on every run -> sweep evaluators (alpha_ell, regime) -> result JSON, plots

``Sweep`` holds what every step needs (config, registry entries, record store, device, console), so
``run`` reads as that list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from rich.console import Console

import archbench
from archbench.config import COMPILE, ENGINES, Config, EvalSpec, resolve_config
from archbench.env import environment, resolve_device
from archbench.errors import ArchbenchError, UsageError, unknown
from archbench.evaluator import point_label
from archbench.model import StreamModel, build_model, check_stream_shapes
from archbench.progress import Progress
from archbench.records import (RunRecord, RunStore, atomic_write, digest, read_checkpoint, remove_stale_temporaries,
                               run_spec, set_aside, write_json)
from archbench.registry import BLOCKS, EVALUATORS, TASKS, Entry
from archbench.train import Outcome, TrainConfig, train


@dataclasses.dataclass
class Run:
    """One (grid point, teacher, depth, seed) of a sweep, and the key its record has."""

    vary: dict
    config: Config
    depth: int
    seed: int
    spec: dict
    key: str
    teacher: int | None = None

    @property
    def label(self) -> str:
        teacher = f"teacher {self.teacher}, " if self.teacher is not None else ""
        return (point_label(self.vary) + ", " if self.vary else "") + teacher + f"depth {self.depth} seed {self.seed}"


def run_eval(spec: EvalSpec, console: Console | None = None,
             on_run: Callable[[list[RunRecord], Any], None] | None = None,
             on_eval: Callable[[int, list[tuple[int, int, dict]]], None] | None = None) -> dict:
    """Train (or find cached) every run of the sweep, then run the evaluators; returns the result JSON.

    ``on_run(records, task)`` is called after each run with the records so far, ``on_eval(step, points)``
    at each in-training held-out evaluation (``train.eval_every``) with ``(depth, seed, metrics)`` of the
    runs training then (all of a batch, or the one run of the plain loop). A search reports
    intermediate values from them, and may stop the sweep by raising."""
    return Sweep(spec, console).run(on_run, on_eval)


class Sweep:
    def __init__(self, spec: EvalSpec, console: Console | None = None):
        if spec.engine not in ENGINES:
            raise unknown("engine", spec.engine, ENGINES)
        if spec.compile not in COMPILE:
            raise unknown("--compile setting", spec.compile, COMPILE)
        self.spec = spec
        self.console = console or Console(stderr=True)
        self.on_eval = None  # run()'s callback at in-training evaluations
        self.config = resolve_config(spec)
        self.points = self.config.points()
        self.block, self.task_entry = BLOCKS.get(spec.block), TASKS.get(spec.task)
        self.evaluators = {name: EVALUATORS.get(name).obj(**knobs) for name, knobs in self.config.evaluators.items()}
        self.device = resolve_device(spec.device)
        self.store = RunStore(spec.runs_dir)
        self.env = environment(self.device)
        self.runs = []
        for vary, point in self.points:
            for teacher, c in point.replicas():
                for depth in self.config.depths:
                    for seed in range(self.config.seeds):
                        determinants = run_spec(self.block, self.task_entry, c, depth, seed)
                        self.runs.append(Run(vary, c, depth, seed, determinants, digest(determinants), teacher))
        self._tasks: dict[str, Any] = {}

    def run(self, on_run=None, on_eval=None) -> dict:
        self.check()
        records = []
        self.on_eval = on_eval
        found = {run.key: self.store.load(run.key) for run in self.runs}  # each record read and checked once
        with Progress(self.console) as progress:
            if self.spec.ray:
                fresh = self.train_on_ray(found, progress)
            else:
                fresh = {} if self.spec.engine == "plain" else self.train_together(found, progress)
            bar = progress.add("sweep", total=len(self.runs), unit="run")
            for run in self.runs:
                record, model = self.record_of(run, found, fresh, progress)
                records.append(self.measure(record, model, run))
                progress.update(bar, advance=1)
                if on_run is not None:
                    on_run(records, self.task(run.config))
        metrics, plots = self.evaluate_sweep(records)
        return self.write_result(records, metrics, plots)

    def check(self) -> None:
        """Everything that can be refused, refused before anything trains: every grid point's task and a
        model of each shape are built, the runs directory takes a file, the result's path is usable."""
        shapes = set()
        for _, c in self.points:
            for _, r in c.replicas():
                task = self.task(r)
            if (shape := digest([c.block, c.model])) not in shapes:
                shapes.add(shape)
                make_model(self.block, c, self.config.depths[0], task)
        if self.out.is_dir():
            raise UsageError(f"--out {self.out}: is a folder; give the result's file name, e.g. {self.out}/result.json")
        self.store.prepare()
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"--out {self.out}: cannot make its folder ({e.strerror or e})") from None
        remove_stale_temporaries(self.out.parent)

    # ------------------------------------------------------------------------------------ the runs

    def task(self, config: Config):
        """The task object of a grid point (one per distinct task configuration)."""
        key = digest(config.task)
        if key not in self._tasks:
            self._tasks[key] = make_task(self.task_entry, config.task, self.device)
        return self._tasks[key]

    def record_of(self, run: Run, found: dict, fresh: dict,
                  progress: Progress) -> tuple[RunRecord, StreamModel | None]:
        """The run's record (trained now if it has none) and its model if it is in memory. A run that another
        process is training is waited for, then read."""
        if run.key in fresh:
            record, model = fresh[run.key]
        elif (record := found[run.key]) is not None:
            record.cached, model = True, None
        else:
            def waiting(owner):
                self.console.print(f"[dim]{run.label}: being trained by {owner}; waiting for it[/]")

            with self.store.claim(run.key, on_wait=waiting):
                if (record := self.store.load(run.key)) is not None:  # finished by the other process
                    record.cached, model = True, None
                else:
                    record, model = self.train_one(run, progress)
        record.vary, record.teacher = run.vary, run.teacher
        if not record.cached:
            self.console.print(_run_line(record, run.label))
        return record, model

    def train_one(self, run: Run, progress: Progress) -> tuple[RunRecord, StreamModel]:
        task, cfg = self.task(run.config), TrainConfig(**run.config.train)
        bar = progress.add(run.label, total=cfg.steps)
        model = new_model(self.block, run.config, run.depth, run.seed, task)
        ckpt = self.store.checkpoint_path(run.key)
        on_eval = self.on_eval and (lambda step, m: self.on_eval(step, [(run.depth, run.seed, m)]))
        outcome = train(model, task, cfg, seed=run.seed, depth=run.depth, checkpoint=ckpt,
                        on_log=lambda step, loss: progress.update(bar, completed=step, info=f"loss {loss:.4g}"),
                        on_eval=on_eval)
        progress.remove(bar)
        return self.save(run, model, outcome, {"name": "plain"}), model

    def train_together(self, found: dict, progress: Progress) -> dict[str, tuple[RunRecord, StreamModel]]:
        """Train the uncached runs with the batched engine, one batch per training budget and step to resume
        from; returns {key: (record, model)}. Runs another process is training are left to ``record_of``
        (which waits for them), runs it cannot batch to the plain loop (with a note why)."""
        from archbench.batched import NotBatchable, checkpoint_step

        budgets: dict[tuple, list[tuple[Run, dict | None]]] = {}
        fresh = {}
        with contextlib.ExitStack() as held:
            for run in self.claim_untrained(found, held):
                resume = read_checkpoint(self.store.checkpoint_path(run.key), self.device)
                budget = digest({k: v for k, v in run.config.train.items() if k != "lr"})  # lr differences group
                budgets.setdefault((budget, checkpoint_step(resume)), []).append((run, resume))
            for todo in (runs for runs in budgets.values() if len(runs) > 1):
                try:
                    fresh.update(self.train_batch(todo, progress))
                except NotBatchable as e:
                    if self.spec.engine == "batched":
                        raise UsageError(f"--engine batched: these runs cannot be trained together: {e}; "
                                         f"use --engine plain") from None
                    self.console.print(f"[dim]training one run at a time: {e}[/]")
        return fresh

    def claim_untrained(self, found: dict, held: contextlib.ExitStack):
        """The runs with no record that no other process is training, each claimed (in ``held``) for this one;
        ``found`` is updated for those another process finished since it was read."""
        for run in self.runs:
            if found[run.key] is not None or not held.enter_context(self.store.claim(run.key, wait=False)):
                continue
            found[run.key] = self.store.load(run.key)
            if found[run.key] is None:  # not finished since we looked
                yield run

    def train_on_ray(self, found: dict, progress: Progress) -> dict[str, tuple[RunRecord, None]]:
        """Train the uncached runs as tasks on the Ray cluster at ``--ray`` (archbench.cluster), writing each
        record and its weights here as it arrives; returns {key: (record, None)}."""
        from archbench import cluster

        if self.spec.engine == "batched":
            raise UsageError("--engine batched trains runs together in one process; with --ray each run is a "
                             "task of its own: leave --engine at auto")
        cluster.connect(self.spec.ray)
        fresh = {}
        with contextlib.ExitStack() as held:
            todo = list(self.claim_untrained(found, held))
            if not todo:
                return fresh
            bar = progress.add(f"{len(todo)} runs on the Ray cluster", total=len(todo), unit="run")

            def done(run: Run, data: dict, weights: bytes):
                record = RunRecord.from_json(data, run.key)
                atomic_write(self.store.weights_path(run.key), lambda f: f.write(weights))
                self.store.save(record)
                fresh[run.key] = (record, None)
                progress.update(bar, advance=1)

            try:
                cluster.train_runs(self, todo, done)
            finally:
                progress.remove(bar)
        return fresh

    def train_batch(self, todo: list[tuple[Run, dict | None]], progress: Progress) -> dict:
        from archbench.batched import Job, compile_steps, train_batched

        jobs = []
        for r, resume in todo:
            task = self.task(r.config)
            # the task's input (vocabulary, sequence length) shapes the model too: runs at different
            # task.seq_len train in groups of their own, side by side
            jobs.append(Job(new_model(self.block, r.config, r.depth, r.seed, task), task, TrainConfig(**r.config.train),
                            r.seed, r.depth, shape=digest([r.config.block, r.config.model, r.depth, task.input]),
                            checkpoint=self.store.checkpoint_path(r.key), resume=resume))
        bar = progress.add(f"{len(jobs)} runs together", total=jobs[0].cfg.steps)

        def on_log(step, losses):
            finite = [v for v in losses if math.isfinite(v)]
            progress.update(bar, completed=step,
                            info=f"loss {min(finite):.3g}-{max(finite):.3g}" if finite else "no finite loss")

        compiled = compile_steps(self.spec.compile, jobs[0].cfg.steps)
        try:
            on_eval = self.on_eval and (lambda step, ms: self.on_eval(step, [(r.depth, r.seed, m) for (r, _), m
                                                                              in zip(todo, ms) if m is not None]))
            outcomes = train_batched(jobs, on_log, compiled=compiled, on_eval=on_eval)
        finally:
            progress.remove(bar)
        engine = {"name": "batched", "runs": len(jobs), "wall_s": round(sum(o.train_s for o in outcomes), 3),
                  **({"compiled": True} if compiled else {})}
        return {run.key: (self.save(run, job.model, outcome, engine), job.model)
                for (run, _), job, outcome in zip(todo, jobs, outcomes)}

    def save(self, run: Run, model: StreamModel, outcome: Outcome, engine: dict) -> RunRecord:
        ok = outcome.status == "ok"
        record = RunRecord(
            key=run.key, spec=run.spec, depth=run.depth, effective_depth=model.effective_depth, seed=run.seed,
            status=outcome.status, final_loss=outcome.final_loss if math.isfinite(outcome.final_loss) else None,
            params=sum(p.numel() for p in model.parameters()), eval=outcome.metrics, metrics={},
            solved=self.task(run.config).solved(outcome.metrics) if ok else False, failure=outcome.failure,
            steps_done=outcome.steps_done, history=outcome.history, eval_history=outcome.eval_history,
            wall_s=round(outcome.train_s, 3),
            source={"archbench": archbench.__version__, "block": self.block.source_hash, "task": self.task_entry.source_hash},
            env=self.env, engine=engine, finished=datetime.datetime.now(datetime.timezone.utc).isoformat())
        self.store.save_weights(run.key, model.state_dict())
        self.store.save(record)
        self.store.checkpoint_path(run.key).unlink(missing_ok=True)  # the record supersedes it
        return record

    def measure(self, record: RunRecord, model: StreamModel | None, run: Run) -> RunRecord:
        """Run the per-model evaluators the record lacks (measured with other knobs or another version
        counts as lacking); ``model`` is None for a cached run, whose weights are loaded."""
        wanted = {name: {"knobs": run.config.evaluators[name], "version": EVALUATORS.get(name).version}
                  for name, ev in self.evaluators.items() if ev.kind == "model"}
        todo = [n for n, w in wanted.items()
                if {k: record.metrics.get(n, {}).get(k) for k in ("knobs", "version")} != w]
        if not todo or not record.ok:
            return record
        task = self.task(run.config)
        model = model or load_model(self.store, self.block, run.config, record, task, why=", ".join(todo))
        if model is None:
            return record
        model.eval()
        for name in todo:
            record.metrics[name] = {**self.evaluators[name].evaluate_model(model, task), **wanted[name]}
        self.store.save(record)
        return record

    # ---------------------------------------------------------------------------------- the sweep

    @property
    def out(self) -> Path:
        if self.spec.out:
            return Path(self.spec.out)
        name = f"{self.spec.block}__{self.spec.task}__{digest(self.config.to_json())[:8]}.json"
        return Path(self.spec.runs_dir) / "results" / name

    def evaluate_sweep(self, records: list[RunRecord]) -> tuple[dict, list[str]]:
        """Every evaluator's result over the sweep (a per-point one once per grid point), and the figures."""
        metrics, plots = {}, []
        self.out.parent.mkdir(parents=True, exist_ok=True)

        def models(record):  # for sweep evaluators that compare trained models (layer-correspondence)
            c = next(run.config for run in self.runs if run.key == record.key)
            return load_model(self.store, self.block, c, record, self.task(c))

        def plot(name, ev, result, rs, suffix=""):
            if self.spec.plots and ev.plot(result, rs, path := self.out.with_suffix(f".{name}{suffix}.png")):
                plots.append(str(path))

        for name, ev in self.evaluators.items():
            sweep = (lambda rs, task: ev.evaluate_sweep(rs, task, models)) if ev.needs_models else ev.evaluate_sweep
            if ev.kind == "model":
                metrics[name] = {"per_run": {r.key: r.metrics.get(name) for r in records}}
                plot(name, ev, metrics[name], records)
            elif ev.across_points or len(self.points) == 1:
                metrics[name] = sweep(records, self.task(self.points[0][1]) if len(self.points) == 1 else None)
                plot(name, ev, metrics[name], records)
            else:  # a per-point sweep evaluator (alpha_ell): once per grid point, with that point's task
                metrics[name] = {"points": []}
                for vary, c in self.points:
                    rs = [r for r in records if r.vary == vary]
                    result = {"vary": vary, **sweep(rs, self.task(c))}
                    metrics[name]["points"].append(result)
                    plot(name, ev, result, rs, "." + point_label(vary).replace(", ", "_").replace("=", "-"))
                if len(self.config.grid) <= 2 and self.spec.plots:  # the result against the swept knob(s)
                    knobs = list(self.config.grid)
                    path = self.out.with_suffix(f".{name}.{'.'.join(k.split('.', 1)[1] for k in knobs)}.png")
                    if ev.plot_points(knobs, metrics[name]["points"], path):
                        plots.append(str(path))
        return metrics, plots

    def write_result(self, records: list[RunRecord], metrics: dict, plots: list[str]) -> dict:
        alpha = metrics.get("alpha-ell", {})
        result = {"block": self.spec.block, "task": self.spec.task, "config": self.config.to_json(),
                  "runs": [r.summary() for r in records],
                  "alpha_ell": {"value": alpha.get("value"), "ci95": alpha.get("ci95")}, "metrics": metrics,
                  "env": self.env, "command": sys.argv,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  "files": {"result": str(self.out), "plots": plots}}
        write_json(self.out, result)
        return result


# ------------------------------------------------------------------------------ building models and tasks

def make_task(entry: Entry, cfg: dict, device: torch.device):
    try:
        return entry.obj(device=device, **cfg)
    except ArchbenchError:
        raise
    except Exception as e:
        raise ArchbenchError(f"task {entry.name!r} could not be built with {cfg}: {type(e).__name__}: {e}") from None


def make_model(block: Entry, config: Config, depth: int, task) -> StreamModel:
    width = config.model["width"]
    return build_model(block.obj, config.block, depth, task.input, width, config.model["zero_head"], block.name,
                       task.readout(width))


def new_model(block: Entry, config: Config, depth: int, seed: int, task) -> StreamModel:
    """The model a run starts from: the same for a given seed, whichever engine trains it."""
    torch.manual_seed(seed)
    model = make_model(block, config, depth, task).to(task.device)
    probe = task.batch(2, torch.Generator(device=task.device).manual_seed(seed + 7919))[0]
    check_stream_shapes(model, probe, block.name)
    return model


def load_model(store: RunStore, block: Entry, config: Config, record: RunRecord, task,
               why: str = "") -> StreamModel | None:
    """A finished run's trained model from its saved weights (None, with a warning, if they are gone or unusable)."""
    weights = store.weights_path(record.key)
    if not weights.exists():
        warnings.warn(f"run {record.key} has no saved weights; skipping {why or 'it'}")
        return None
    model = make_model(block, config, record.depth, task).to(task.device)
    try:
        model.load_state_dict(torch.load(weights, map_location=task.device, weights_only=True))
    except Exception as e:  # a truncated or foreign file: set aside, the run's record stays
        set_aside(weights, f"weights unreadable: {type(e).__name__}", then=f"skipping {why or 'it'}")
        return None
    return model.eval()


def _run_line(r: RunRecord, where: str) -> str:
    if not r.ok:
        return f"{where}: [red]failed[/] ({r.failure})"
    solved = {True: "  solved", False: "  not solved", None: ""}[r.solved]
    return f"{where}: loss {r.final_loss:.5g}{solved}  ({r.wall_s:.1f} s)"
