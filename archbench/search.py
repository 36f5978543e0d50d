"""Architecture search: Optuna samples a block family, that family's knobs and a model size under a
budget; each trial is an ``archbench eval`` depth sweep, scored by the objectives below.

- **Space.** A trial first draws ``block`` from the families in the space, then that block's knobs
  (Optuna parameters named ``BLOCK.KNOB``, so each family's knobs exist only when it is drawn), then
  any ``train.*``/``model.*`` parameters the space adds. By default a block's searched knobs are the
  ones it declares a ``Range`` (or ``Literal`` choices) for, minus those the preset or ``--set`` pins.
  A TOML file (``--space``) narrows the families, adds ranges and pins values.
- **Budget.** ``params`` (default): the model width is the largest multiple of the width step whose
  parameter count at the sweep's largest depth is at most the baseline's (the ``residual`` block at
  the preset's width). ``flops``: the same with forward FLOPs per example, counted by
  ``archbench.nn.flop_counter`` (recurrent blocks pay for every application of a shared layer).
  ``none``: the preset's width for every trial.
- **Objectives.** ``alpha`` (α_ℓ, maximise), ``loss`` (held-out loss at the largest depth, minimise),
  ``depth-to-solve`` (hardest difficulty; unsolved counts as twice the largest depth tried, minimise),
  ``redundancy`` (1 − mean effect of skipping a layer on the later layers, capped at 0; minimise).
  Several objectives make a multi-objective study whose answer is the Pareto front.
- **Pruning.** In a single-objective study each trial reports the objective computed on the depths
  finished so far (the depths train in increasing order, one run at a time), and Optuna's pruner
  stops trials that are hopeless at that depth. Multi-objective studies are not pruned (Optuna has no
  pruner for them), so their trials train all depths together with the batched engine.
- **Failures are data.** A trial that diverges, runs out of memory, exceeds the budget or raises is
  marked FAIL with the reason in its ``failure`` attribute, and the study goes on.
- **Storage and resume.** A SQLite file under the runs directory by default; the study keeps the
  search's configuration and refuses a different one under the same name. Rerunning the command
  continues the study up to ``--trials`` trials in all, re-queues trials cut off by an interruption
  (or, with a shared database, by a worker that died: Optuna's heartbeat), and reuses every finished
  run record. ``--workers K`` runs K processes on one machine; many machines share a study through a
  PostgreSQL URL.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import socket
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution,
                                  distribution_to_json)
from optuna.trial import TrialState

import archbench
from archbench.errors import ArchbenchError, UsageError, unknown
from archbench.knobs import base_type, knobs_of
from archbench.registry import BLOCKS, TASKS

# a trial's failure reason lives in this user attribute; a FAIL without it was cut off and is re-queued
FAILURE = "failure"


class TrialFailed(Exception):
    """A trial that produced no objective values (diverged, over budget, raised): recorded, not fatal."""


# ---------------------------------------------------------------------------------------------- objectives

@dataclasses.dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" or "minimize"
    evaluators: tuple[str, ...]  # what the trial's eval must run
    help: str


OBJECTIVES = {o.name: o for o in (
    Objective("alpha", "maximize", ("alpha-ell",), "α_ℓ of the loss-depth fit: above 1 escapes ensemble averaging"),
    Objective("loss", "minimize", (), "held-out loss at the largest depth (mean over seeds)"),
    Objective("depth-to-solve", "minimize", ("depth-to-solve",),
              "depth that solves the hardest difficulty (unsolved: twice the largest depth tried)"),
    Objective("redundancy", "minimize", ("skip-sensitivity",),
              "1 - mean effect of skipping a layer on later layers, at the largest depth (floored at 0)"),
)}


def _deepest(runs: list[dict]) -> list[dict]:
    ok = [r for r in runs if r["status"] == "ok"]
    top = max((r["depth"] for r in ok), default=None)
    return [r for r in ok if r["depth"] == top]


def objective_value(name: str, result: dict) -> float | None:
    """The objective ``name`` of a finished eval result (None if it could not be computed)."""
    metrics, runs = result["metrics"], result["runs"]
    if name == "alpha":
        return metrics.get("alpha-ell", {}).get("value")
    if name == "loss":
        deepest = _deepest(runs)
        return sum(r["final_loss"] for r in deepest) / len(deepest) if deepest else None
    if name == "depth-to-solve":
        rows = metrics.get("depth-to-solve", {}).get("difficulties") or []
        if not rows:
            return None
        hardest = rows[-1]
        d = hardest["depth_to_solve"]
        return float(d if d is not None else 2 * hardest["max_depth_tried"])
    if name == "redundancy":
        effects = [v for r in _deepest(runs)
                   for v in (r["metrics"].get("skip-sensitivity") or {}).get("effect_on_later") or []]
        return max(0.0, 1.0 - sum(effects) / len(effects)) if effects else None
    raise UsageError(f"unknown objective {name!r}")


def intermediate_value(name: str, runs: list[dict], task) -> float | None:
    """The objective on the depths finished so far, for the pruner (loss and alpha only)."""
    if name == "loss":
        return objective_value("loss", {"metrics": {}, "runs": runs})
    if name == "alpha" and len({r["depth"] for r in runs if r["status"] == "ok"}) >= 2:
        from archbench.evaluators.alpha_ell import AlphaEll

        return AlphaEll(n_boot=0).evaluate_sweep(runs, task).get("value")
    return None


def parse_objectives(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UsageError("--objective: name at least one of " + ", ".join(OBJECTIVES))
    for n in names:
        if n not in OBJECTIVES:
            raise unknown("objective", n, OBJECTIVES)
    if len(set(names)) != len(names):
        raise UsageError(f"--objective {text!r}: an objective is named twice")
    return names


# --------------------------------------------------------------------------------------------------- space

@dataclasses.dataclass
class Space:
    """Families a trial may draw and, per family, the distributions of its searched knobs.

    ``params[block]`` maps knob -> distribution; ``params["*"]`` holds ``train.X``/``model.X`` entries
    sampled in every trial; ``pinned[block]`` fixes knobs to values."""

    blocks: list[str]
    params: dict[str, dict[str, BaseDistribution]]
    pinned: dict[str, dict[str, Any]]

    def to_json(self) -> dict:
        return {"blocks": self.blocks, "pinned": self.pinned,
                "params": {b: {k: json.loads(distribution_to_json(d)) for k, d in ps.items()}
                           for b, ps in self.params.items()}}


def knob_distribution(knob) -> BaseDistribution | None:
    """The distribution a knob's annotation declares: its Range, or its Literal choices."""
    base = base_type(knob.type)
    if knob.range is not None:
        low, high, log = knob.range.low, knob.range.high, knob.range.log
        if base is int:
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if knob.choices:
        return CategoricalDistribution(list(knob.choices))
    return None


def _spec_distribution(where: str, value: Any) -> BaseDistribution | None:
    """A space-file entry: ``{low, high[, log]}`` (int if both ends are), ``{choices = [...]}``, or a
    plain value (None: the caller pins it)."""
    if not isinstance(value, dict):
        return None
    if "choices" in value and set(value) == {"choices"} and value["choices"]:
        return CategoricalDistribution(list(value["choices"]))
    if {"low", "high"} <= set(value) <= {"low", "high", "log"}:
        low, high, log = value["low"], value["high"], bool(value.get("log", False))
        try:
            if isinstance(low, int) and isinstance(high, int) and not isinstance(low, bool):
                return IntDistribution(low, high, log=log)
            return FloatDistribution(float(low), float(high), log=log)
        except ValueError as e:
            raise UsageError(f"space entry {where}: {e}") from None
    raise UsageError(f"space entry {where} = {value!r}: expected {{low = .., high = .., log = true|false}}, "
                     f"{{choices = [..]}} or a plain value")


def build_space(task: str, preset: str, sets: dict, path: str | None) -> Space:
    """The default space (every block, every declared Range) adjusted by the space file at ``path``."""
    raw: dict = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise UsageError(f"--space {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"--space {path}: not valid TOML ({e})") from None
        extra = set(raw) - {"blocks", "params", "defaults"}
        if extra:
            raise unknown(f"key in space file {path}", sorted(extra)[0], ["blocks", "params", "defaults"])
    names = [e.name for e in BLOCKS.entries()]
    blocks = raw.get("blocks", names)
    if not isinstance(blocks, list) or not blocks:
        raise UsageError(f"--space {path}: 'blocks' must be a non-empty list of block names")
    for b in blocks:
        BLOCKS.get(b)  # a typo gets close names
    suggested = TASKS.get(task).obj.presets.get(preset, {}).get("block", {})
    fixed_by_user = set(sets.get("block", {}))
    params: dict[str, dict[str, BaseDistribution]] = {b: {} for b in blocks}
    pinned: dict[str, dict[str, Any]] = {b: {} for b in blocks}
    if raw.get("defaults", True):
        for b in blocks:
            for name, knob in BLOCKS.get(b).knobs.items():
                if name in suggested or name in fixed_by_user:
                    continue
                dist = knob_distribution(knob)
                if dist is not None:
                    params[b][name] = dist
    params["*"] = {}
    for key, value in (raw.get("params") or {}).items():
        owner, dot, knob = key.partition(".")
        if not dot:
            raise UsageError(f"space entry {key!r}: expected BLOCK.KNOB, train.KNOB or model.KNOB")
        if owner in ("train", "model"):
            from archbench.sweep import ModelConfig
            from archbench.train import TrainConfig

            target = {"train": TrainConfig, "model": ModelConfig}[owner]
            if knob not in knobs_of(target):
                raise unknown(f"setting in space file", key, [f"{owner}.{k}" for k in knobs_of(target)])
            dist = _spec_distribution(key, value)
            if dist is None:
                raise UsageError(f"space entry {key!r}: pin train/model values with --set {key}={value}")
            params["*"][key] = dist
            continue
        if owner not in params:
            raise unknown("block in space file (not in 'blocks')", owner, blocks)
        knobs = BLOCKS.get(owner).knobs
        if knob not in knobs:
            raise unknown(f"knob of block {owner!r}", key, [f"{owner}.{k}" for k in knobs])
        dist = _spec_distribution(key, value)
        if dist is None:
            params[owner].pop(knob, None)
            pinned[owner][knob] = value
        else:
            params[owner][knob] = dist
    return Space(blocks, params, pinned)


def sample(trial: optuna.Trial, space: Space) -> tuple[str, dict[str, dict[str, Any]]]:
    """Draw a block and its knobs: (block, {"block": {...}, "train": {...}, "model": {...}})."""
    block = trial.suggest_categorical("block", space.blocks)
    sets: dict[str, dict[str, Any]] = {"block": dict(space.pinned.get(block, {}))}
    for knob, dist in space.params.get(block, {}).items():
        sets["block"][knob] = _suggest(trial, f"{block}.{knob}", dist)
    for key, dist in space.params.get("*", {}).items():
        section, knob = key.split(".", 1)
        sets.setdefault(section, {})[knob] = _suggest(trial, key, dist)
    return block, sets


def _suggest(trial, name: str, dist: BaseDistribution):
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_categorical(name, dist.choices)


# -------------------------------------------------------------------------------------------------- budget

def measure(block: str, config: dict, depth: int, task, width: int, budget: str) -> int:
    """Parameters, or forward FLOPs for one example, of ``block`` at ``depth`` and ``width``."""
    import torch

    from archbench.model import build_model
    from archbench.nn import flop_counter

    entry = BLOCKS.get(block)
    with torch.device("cpu"):
        model = build_model(entry.obj, config["block"], depth, task.input, width, config["model"]["zero_head"],
                            entry.name)
    if budget == "params":
        return sum(p.numel() for p in model.parameters())
    x = task.batch(1, torch.Generator(device=task.device).manual_seed(0))[0].cpu()
    counter = flop_counter()
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def width_step(block_cfg: dict) -> int:
    """Widths move in steps of 4 that the head count divides (where the block attends)."""
    heads = block_cfg.get("heads") if block_cfg.get("attention", True) else 1
    return math.lcm(4, int(heads)) if isinstance(heads, int) and heads > 0 else 4


def fit_width(block: str, config: dict, depth: int, task, budget: str, limit: int, ceiling: int) -> tuple[int, int]:
    """The largest width (a multiple of ``width_step``) whose measure at ``depth`` is at most ``limit``."""
    step, best = width_step(config["block"]), None
    errors = []
    for width in range(step, ceiling + 1, step):
        c = {**config, "model": {**config["model"], "width": width}}
        try:
            m = measure(block, c, depth, task, width, budget)
        except ArchbenchError as e:  # this width is not allowed by the block (e.g. heads must divide it)
            errors.append(str(e))
            continue
        if m > limit:
            break
        best = (width, m)
    if best is None:
        why = f" ({errors[0]})" if errors else ""
        raise TrialFailed(f"over budget: no width fits {budget} <= {limit:,} at depth {depth}{why}")
    return best


# --------------------------------------------------------------------------------------------------- study

@dataclasses.dataclass
class SearchSpec:
    task: str = "teacher-student"
    trials: int = 30
    study: str | None = None
    storage: str | None = None
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["alpha", "loss"])
    space: str | None = None
    workers: int = 1
    preset: str = "quick"
    depths: list[int] | None = None
    seeds: int | None = None
    sets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    budget: typing.Literal["params", "flops", "none"] = "params"
    baseline: str | None = "residual"
    pruner: typing.Literal["median", "none"] = "median"
    seed: int = 0
    device: str = "auto"
    runs_dir: str = "runs"
    plugins: list[str] = dataclasses.field(default_factory=list)

    @property
    def study_name(self) -> str:
        return self.study or f"{self.task}-{'+'.join(self.objectives)}-{self.preset}"

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.runs_dir).resolve() / 'studies.db'}"

    @property
    def study_dir(self) -> Path:
        return Path(self.runs_dir) / "studies" / self.study_name


def open_storage(url: str, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``: SQLite or PostgreSQL (RDB, with a heartbeat so that a dead
    worker's trial is noticed and re-queued), or ``journal:PATH`` for Optuna's journal file."""
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if not (url.startswith("sqlite:///") or url.startswith("postgresql")):
        raise UsageError(f"--storage {url!r}: expected sqlite:///PATH, postgresql://USER@HOST/DB or journal:PATH")
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}  # K workers take turns writing
    if heartbeat:
        kwargs.update(heartbeat_interval=20, grace_period=90, heartbeat_stale_trial_callback=requeue)
    try:
        with warnings.catch_warnings():  # the heartbeat is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, **kwargs)
    except ModuleNotFoundError as e:
        raise UsageError(f"--storage {url!r}: the database driver is missing ({e.name}); "
                         f"install it with: pip install 'archbench[postgres]'") from None
    except Exception as e:  # sqlalchemy's connection errors: say which URL
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "import" in first.lower():
            first += "; for PostgreSQL: pip install 'archbench[postgres]'"
        raise UsageError(f"--storage {url!r}: cannot open ({first})") from None


def search_config(spec: SearchSpec, space: Space) -> dict:
    """What a study is: a rerun under the same name must match it."""
    return {"task": spec.task, "preset": spec.preset, "depths": spec.depths, "seeds": spec.seeds,
            "sets": spec.sets, "objectives": spec.objectives, "budget": spec.budget, "baseline": spec.baseline,
            "space": space.to_json()}


def open_study(spec: SearchSpec, space: Space, storage=None) -> optuna.Study:
    directions = [OBJECTIVES[o].direction for o in spec.objectives]
    storage = storage or open_storage(spec.storage_url)
    with warnings.catch_warnings():  # multivariate/group (conditional spaces) are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True, constant_liar=True,
                                             n_startup_trials=min(10, max(2, spec.trials // 3)))
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
              if spec.pruner == "median" and len(directions) == 1 else optuna.pruners.NopPruner())
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # archbench prints its own line per trial
    study = optuna.create_study(storage=storage, study_name=spec.study_name, directions=directions,
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    want = json.loads(json.dumps(search_config(spec, space), default=str))
    have = study.user_attrs.get("archbench_search")
    if have is None:
        study.set_user_attr("archbench_search", want)
        study.set_user_attr("archbench_version", archbench.__version__)
    elif have != want:
        differ = sorted(k for k in want if have.get(k) != want[k])
        raise UsageError(f"study {spec.study_name!r} in {spec.storage_url} was made with a different "
                         f"{', '.join(differ)}; rerun with the same settings, or name a new study with --study")
    return study


def counted(study: optuna.Study) -> int:
    """Trials that count towards ``--trials``: those started (queued ones are not yet), less those cut
    off (FAIL with no recorded reason), which are queued again."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not (t.state == TrialState.FAIL and FAILURE not in t.user_attrs))


def requeue(study: optuna.Study, trial) -> None:
    """Queue a cut-off trial's parameters again (its run records make the repeat cheap)."""
    if trial.state == TrialState.FAIL and FAILURE not in trial.user_attrs and trial.params:
        retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
        if trial.number not in retried:
            keep = {"baseline": True} if trial.user_attrs.get("baseline") else {}
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number, **keep})


def _dead_here(worker: str) -> bool:
    """Whether ``host:pid`` names a process of this machine that no longer exists."""
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def enqueue_baseline(study: optuna.Study, space: Space, baseline: str) -> None:
    """The baseline block at its default knobs is the study's first trial: the reference every other
    trial is compared with, measured under the same budget."""
    if baseline not in space.blocks or any(t.user_attrs.get("baseline") for t in study.get_trials(deepcopy=False)):
        return
    knobs = BLOCKS.get(baseline).knobs
    params: dict[str, Any] = {"block": baseline}
    for name, dist in space.params.get(baseline, {}).items():
        default = knobs[name].default
        inside = (default in dist.choices if isinstance(dist, CategoricalDistribution)
                  else default is not None and dist.low <= default <= dist.high)
        if inside:
            params[f"{baseline}.{name}"] = default
    study.enqueue_trial(params, user_attrs={"baseline": True})


# ------------------------------------------------------------------------------------------------- a trial

class TrialRunner:
    """The objective function: one trial = sample, fit the budget, run the eval sweep, score it."""

    def __init__(self, spec: SearchSpec, space: Space, console=None):
        from archbench.sweep import EvalSpec, make_task, resolve_config

        self.spec, self.space, self.console = spec, space, console
        evaluators = sorted({e for o in spec.objectives for e in OBJECTIVES[o].evaluators})
        self.evaluators = evaluators
        # a pruned study needs the depths one after another (the batched engine trains them together)
        engine = "plain" if spec.pruner != "none" and len(spec.objectives) == 1 else "auto"
        self._eval_spec = lambda block, sets: EvalSpec(
            block=block, task=spec.task, preset=spec.preset, depths=spec.depths, seeds=spec.seeds,
            sets=sets, evaluators=evaluators, device=spec.device, runs_dir=spec.runs_dir, plots=False,
            engine=engine)
        # the baseline's resolved config checks task, preset, --set and the objectives' evaluators up front
        ref = resolve_config(self._eval_spec(spec.baseline or "residual", spec.sets))
        self.limit = None
        if spec.budget != "none":
            import torch

            self.ref_width, self.max_depth = ref["model"]["width"], max(ref["depths"])
            self.task = make_task(TASKS.get(spec.task), ref["task"], torch.device("cpu"))
            self.limit = measure(spec.baseline or "residual", ref, self.max_depth, self.task, self.ref_width,
                                 spec.budget)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        from archbench.sweep import resolve_config, run_eval

        spec = self.spec
        self._log(f"trial {trial.number} started by pid {os.getpid()} on {socket.gethostname()}")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            block, sampled = sample(trial, self.space)
            sets = {section: dict(values) for section, values in spec.sets.items()}
            for section, values in sampled.items():  # sampled knobs over --set ones
                sets.setdefault(section, {}).update(values)
            config = resolve_config(self._eval_spec(block, sets))
            if config["grid"]:
                raise UsageError("a search trial is one depth sweep: --set values with commas (grids) are not "
                                 "supported in search")
            if self.limit is not None:
                width, used = fit_width(block, config, self.max_depth, self.task, spec.budget, self.limit,
                                        ceiling=8 * self.ref_width)
                sets.setdefault("model", {})["width"] = width
                trial.set_user_attr("budget", {"kind": spec.budget, "limit": self.limit, "used": used,
                                               "depth": self.max_depth})
            trial.set_user_attr("eval", {"block": block, "sets": sets})
            result = run_eval(self._eval_spec(block, sets), console=self.console,
                              on_run=lambda runs, task: self._report(trial, runs, task, config["seeds"]))
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            raise  # FAIL with no reason: rerunning the search queues it again
        except UsageError as e:  # the sampled configuration is not a valid model
            return self._fail(trial, f"invalid configuration: {e}")
        except TrialFailed as e:
            return self._fail(trial, str(e))
        except Exception as e:  # OOM, a block that raises on these knobs, ...: data, not a crash
            if "out of memory" in str(e).lower():
                _free_cuda()
            return self._fail(trial, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        failed = [r for r in result["runs"] if r["status"] != "ok"]
        trial.set_user_attr("result", result["files"]["result"])
        trial.set_user_attr("records", [r["key"] for r in result["runs"]])
        trial.set_user_attr("runs", [{"depth": r["depth"], "seed": r["seed"], "params": r["params"],
                                      "loss": r["final_loss"], "status": r["status"], "wall_s": r["wall_s"]}
                                     for r in result["runs"]])
        if failed:
            r = failed[0]
            return self._fail(trial, f"depth {r['depth']} seed {r['seed']}: {r['failure']}")
        values = [objective_value(o, result) for o in spec.objectives]
        trial.set_user_attr("alpha_ci95", result["metrics"].get("alpha-ell", {}).get("ci95"))
        for o, v in zip(spec.objectives, values):
            if v is None or not math.isfinite(v):
                note = result["metrics"].get("alpha-ell", {}).get("note", "") if o == "alpha" else ""
                return self._fail(trial, f"objective {o} could not be computed" + (f" ({note})" if note else ""))
        return values

    def _report(self, trial, runs, task, seeds):
        if len(self.spec.objectives) != 1 or len(runs) % seeds:
            return
        value = intermediate_value(self.spec.objectives[0], runs, task)
        if value is not None and math.isfinite(value):
            step = len({r["depth"] for r in runs})
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.spec.objectives[0]} {value:.4g} after {step} depth(s)")

    def _fail(self, trial, reason: str):
        trial.set_user_attr(FAILURE, reason)
        raise TrialFailed(reason)

    def _log(self, line: str) -> None:
        """An append-only audit trail of which worker ran which trial."""
        self.spec.study_dir.mkdir(parents=True, exist_ok=True)
        with open(self.spec.study_dir / "trials.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def _free_cuda():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- running

def run_search(spec: SearchSpec, console=None, on_trial: Callable | None = None) -> dict:
    """Run (or continue) the study until it has ``spec.trials`` trials; returns ``summary(...)``."""
    if spec.trials < 1:
        raise UsageError(f"--trials {spec.trials}: need at least one trial")
    if spec.workers < 1:
        raise UsageError(f"--workers {spec.workers}: need at least one worker")
    if spec.baseline:
        BLOCKS.get(spec.baseline)
    space = build_space(spec.task, spec.preset, spec.sets, spec.space)
    runner = TrialRunner(spec, space, console)  # a bad task, preset, objective or budget fails here, before any write
    study = open_study(spec, space)
    with warnings.catch_warnings():  # trials of a killed run (no heartbeat): cut off, queued again
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead_here(t.user_attrs.get("worker", "")):  # killed before its first heartbeat
            study.tell(t.number, state=TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        requeue(study, t)
    if spec.baseline:
        enqueue_baseline(study, space, spec.baseline)
    remaining = spec.trials - counted(study)
    if remaining > 0:
        if spec.workers == 1:
            _work(spec, space, remaining, runner, on_trial)
        else:
            _spawn(spec, remaining, on_trial)
    return summary(open_study(spec, space), spec)


def _work(spec: SearchSpec, space: Space, share: int, runner: "TrialRunner", on_trial=None) -> None:
    study = open_study(spec, space)
    callbacks = [lambda s, t: on_trial(t)] if on_trial else []
    for _ in range(share):
        if counted(study) >= spec.trials:  # other machines on a shared database may have filled it
            break
        study.optimize(runner, n_trials=1, catch=(TrialFailed,), callbacks=callbacks)


def _worker_main(spec: SearchSpec, share: int, index: int) -> None:
    """One of ``--workers K`` processes (spawned, so CUDA is safe): its share of the trials."""
    import torch

    from archbench.registry import load_plugin_file

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // spec.workers))
    for path in spec.plugins:
        load_plugin_file(path)
    spec = dataclasses.replace(spec, seed=spec.seed + 1000 * (index + 1))  # workers draw different startups
    from rich.console import Console

    with open(spec.study_dir / f"worker-{index}.log", "a", buffering=1) as log:
        sys.stdout = sys.stderr = log  # warnings and tracebacks go to the worker's log, not the terminal
        try:
            space = build_space(spec.task, spec.preset, spec.sets, spec.space)
            _work(spec, space, share, TrialRunner(spec, space, Console(file=log, force_terminal=False, width=120)))
        except KeyboardInterrupt:  # the trial in hand is marked cut off; a rerun queues it again
            pass


def _spawn(spec: SearchSpec, remaining: int, on_trial=None) -> None:
    """K processes split the remaining trials (exactly, so none is run twice or left over); this
    process reports each trial as it ends."""
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    shares = [remaining // spec.workers + (i < remaining % spec.workers) for i in range(spec.workers)]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(spec, n, i), daemon=False) for i, n in enumerate(shares) if n]
    for p in procs:
        p.start()
    storage = open_storage(spec.storage_url, heartbeat=False)
    seen: set[int] = {t.number for t in optuna.load_study(study_name=spec.study_name, storage=storage)
                      .get_trials(deepcopy=False, states=_ENDED)}
    try:
        while True:
            alive = any(p.is_alive() for p in procs)
            study = optuna.load_study(study_name=spec.study_name, storage=storage)
            for t in study.get_trials(deepcopy=False, states=_ENDED):
                if t.number not in seen:
                    seen.add(t.number)
                    if on_trial:
                        on_trial(t)
            if not alive:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        for p in procs:
            p.join(timeout=30)  # each worker got the same SIGINT and marks its trial cut off
        raise
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise ArchbenchError(f"{len(bad)} search worker(s) exited with code(s) {bad}; see "
                             f"{spec.study_dir}/worker-*.log; rerun the command to continue the study")


_ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


# ------------------------------------------------------------------------------------------------- summary

def trial_row(t, objectives: list[str]) -> dict:
    ev = t.user_attrs.get("eval", {})
    block = t.params.get("block")
    defaults = {k: knob.default for k, knob in BLOCKS.get(block).knobs.items()} if block in BLOCKS else {}
    return {"number": t.number, "state": t.state.name, "block": block,
            "knobs": {k.split(".", 1)[1]: v for k, v in t.params.items()
                      if k != "block" and defaults.get(k.split(".", 1)[1], object()) != v},
            "width": ev.get("sets", {}).get("model", {}).get("width"),
            "params": max((r["params"] for r in t.user_attrs.get("runs", [])), default=None),
            "values": dict(zip(objectives, t.values)) if t.values else None,
            "alpha_ci95": t.user_attrs.get("alpha_ci95"), "failure": t.user_attrs.get(FAILURE),
            "baseline": bool(t.user_attrs.get("baseline")),
            "wall_s": sum(r["wall_s"] for r in t.user_attrs.get("runs", [])),
            "eval": ev, "result": t.user_attrs.get("result")}


def summary(study: optuna.Study, spec: SearchSpec) -> dict:
    trials = study.get_trials(deepcopy=False)
    objectives = spec.objectives
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if len(objectives) > 1:
        best = sorted(study.best_trials, key=lambda t: t.number) if complete else []
    else:
        sign = -1 if OBJECTIVES[objectives[0]].direction == "maximize" else 1
        best = sorted(complete, key=lambda t: sign * t.values[0])[:5]
    base = next((t for t in complete if t.user_attrs.get("baseline")), None)
    beats = []
    if base is not None and "alpha" in objectives:
        ia = objectives.index("alpha")
        il = objectives.index("loss") if "loss" in objectives else None
        beats = [t.number for t in complete if t is not base and t.values[ia] > base.values[ia]
                 and (il is None or t.values[il] <= base.values[il])]
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    return {"study": spec.study_name, "storage": spec.storage_url, "objectives": objectives,
            "directions": [OBJECTIVES[o].direction for o in objectives], "trials": len(trials),
            "counted": counted(study), "states": {k: v for k, v in states.items() if v},
            "best": [trial_row(t, objectives) for t in best],
            "baseline": trial_row(base, objectives) if base else None, "beats_baseline": beats,
            "wall_s": sum(trial_row(t, objectives)["wall_s"] for t in trials)}


def eval_command(row: dict, spec: SearchSpec) -> str:
    """The ``archbench eval`` command that reproduces a trial's sweep."""
    ev = row["eval"]
    sets = " ".join(f"--set {s}.{k}={v}" for s, kv in ev.get("sets", {}).items() for k, v in kv.items())
    return f"archbench eval --block {ev.get('block')} --task {spec.task} --preset {spec.preset} {sets}".strip()
