"""The configuration of a sweep: what the user asked for (``EvalSpec``), how ``--set`` reads, and what it
resolves to (``Config``: every knob's value, by section).

Precedence, lowest first: knob defaults < the task's preset < ``--set`` overrides < ``--depths``/``--seeds``.
Sections: ``block``, ``task``, ``model`` (``ModelConfig``), ``train`` (``archbench.train.TrainConfig``) and
``evaluators`` (one sub-section per evaluator, set as ``--set alpha-ell.floor=fit``). A value written
``a,b,c`` sweeps a block/task/model/train knob: ``Config.grid`` holds the values and ``Config.points()``
gives one fully resolved ``Config`` per combination (a *grid point*).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Annotated, Any

from archbench.errors import UsageError, unknown
from archbench.knobs import POSITIVE, knobs_of, resolve
from archbench.model import Stack
from archbench.registry import BLOCKS, EVALUATORS, TASKS, Entry
from archbench.train import TrainConfig

SECTIONS = ("block", "task", "model", "train")  # the sections that determine a run's numbers
ENGINES = ("auto", "batched", "plain")
COMPILE = ("auto", "on", "off")


@dataclasses.dataclass
class ModelConfig:
    width: Annotated[int, POSITIVE] = 32  # residual-stream dimension
    zero_head: bool = True  # zero-initialised readout: every model starts at the uniform prediction


@dataclasses.dataclass
class EvalSpec:
    """What ``archbench eval`` was asked: names, budget and overrides, before resolution."""

    block: str = "residual-mlp"
    task: str = "teacher-student"
    preset: str = "quick"
    depths: list[int] | None = None  # None: the preset's
    recurrence: list[int] | None = None  # recurrent blocks: iteration counts, turned into effective depths
    seeds: int | None = None
    teachers: int | None = None  # replicate over teacher seeds 0..N-1 (tasks with teachers); None: the preset's
    sets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # section -> key -> raw value
    evaluators: list[str] | None = None  # None: the task's default evaluators
    device: str = "auto"
    runs_dir: str = "runs"
    out: str | None = None
    plots: bool = True  # evaluators' figures beside the result JSON (a search turns them off)
    # auto: train the sweep's runs together (archbench.batched) where that is exact, else one by one;
    # batched: insist (an error says why not); plain: the reference loop, one run after another
    engine: str = "auto"
    # the batched engine through torch.compile: auto (batches of COMPILE_MIN_STEPS steps or more), on, off
    compile: str = "auto"
    ray: str | None = None  # a Ray cluster's address: train the runs there, one task each (archbench.cluster)


@dataclasses.dataclass
class Config:
    """A resolved sweep configuration: plain JSON-ready values, every knob filled in."""

    preset: str
    block: dict[str, Any]
    task: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    evaluators: dict[str, dict[str, Any]]  # name -> knobs, in run order (requirements first)
    depths: list[int]
    seeds: int
    grid: dict[str, list] = dataclasses.field(default_factory=dict)  # "section.knob" -> values swept
    # a second replicate axis besides seeds: the task's teacher knob takes 0..teachers-1 (None: as configured)
    teachers: int | None = None
    teacher_knob: str | None = None

    def points(self) -> list[tuple[dict, Config]]:
        """(vary, config) for every grid point; ``vary`` maps "section.knob" to its value there."""
        out = []
        for values in itertools.product(*self.grid.values()):
            vary, c = dict(zip(self.grid, values)), copy.deepcopy(self)
            c.grid = {}
            for key, value in vary.items():
                section, name = key.split(".", 1)
                getattr(c, section)[name] = value
            out.append((vary, c))
        return out

    def replicas(self) -> list[tuple[int | None, Config]]:
        """(teacher, config) for each teacher of this (grid point's) configuration; one (None, self) without
        ``--teachers``."""
        if self.teachers is None:
            return [(None, self)]
        out = []
        for t in range(self.teachers):
            c = copy.deepcopy(self)
            c.task[self.teacher_knob] = t
            out.append((t, c))
        return out

    def with_model(self, **changes) -> Config:
        return dataclasses.replace(self, model={**self.model, **changes})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def parse_sets(items: list[str]) -> dict[str, dict[str, str]]:
    """``["task.teacher=tied", "train.lr=1e-3"]`` -> ``{"task": {"teacher": "tied"}, "train": {"lr": "1e-3"}}``."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not eq or not dot or not section or not name:
            raise UsageError(f"--set {item!r}: expected SECTION.KEY=VALUE, e.g. task.temperature=0.1")
        out.setdefault(section, {})[name] = value
    return out


def resolve_config(spec: EvalSpec) -> Config:
    """``spec`` resolved against the registries and the task's preset; every error raised here, before
    anything trains."""
    block, task = BLOCKS.get(spec.block), TASKS.get(spec.task)
    names = with_requirements(spec.evaluators if spec.evaluators is not None else list(task.obj.default_evaluators))
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
    grid: dict[str, list] = {}

    def section(name: str, target) -> dict:
        suggested = preset.get(name, {})
        if name == "block":  # a preset suggests block knobs (attention=false on vectors) to blocks that have them
            suggested = {k: v for k, v in suggested.items() if k in knobs_of(target)}
        return resolve(target, name, {**suggested, **spec.sets.get(name, {})}, grid if name in SECTIONS else None)

    config = Config(
        preset=spec.preset, block=section("block", block.obj), task=section("task", task.obj),
        model=section("model", ModelConfig), train=section("train", TrainConfig),
        evaluators={name: section(name, e.obj) for name, e in evaluators.items()},
        depths=spec.depths if spec.depths is not None else preset.get("depths", [2, 4, 8]),
        seeds=spec.seeds if spec.seeds is not None else preset.get("seeds", 1), grid=grid)
    config.teachers, config.teacher_knob = _teachers(spec, task, preset, grid)
    if spec.recurrence is not None:
        config.depths = recurrence_depths(block, config.block, spec.recurrence)
    if not config.depths or any(d < 1 for d in config.depths):
        raise UsageError(f"--depths {','.join(map(str, config.depths))}: depths must be positive integers")
    if config.seeds < 1:
        raise UsageError(f"--seeds {config.seeds}: need at least one seed")
    config.depths = sorted(set(config.depths))
    for _, c in config.points():
        TrainConfig(**c.train)  # checks what the knobs' bounds cannot (the optimizer's name)
    if isinstance(block.obj, type) and issubclass(block.obj, Stack):  # a family that says which depths it can be built at
        for _, c in config.points():
            for d in config.depths:
                block.obj.check_depth(d, c.block)
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


def _teachers(spec: EvalSpec, task: Entry, preset: dict, grid: dict) -> tuple[int | None, str | None]:
    """``--teachers N`` (or the preset's): N and the task knob it sets; a teacher set by hand wins over a preset's."""
    knob = getattr(task.obj, "teacher_knob", None)
    chosen_by_hand = knob is not None and (knob in spec.sets.get("task", {}) or f"task.{knob}" in grid)
    if spec.teachers is None:
        n = None if chosen_by_hand else preset.get("teachers")
        return (n, knob) if n is not None else (None, None)
    if knob is None:
        with_teachers = [e.name for e in TASKS.entries() if getattr(e.obj, "teacher_knob", None)]
        raise UsageError(f"--teachers {spec.teachers}: task {task.name!r} has no teachers "
                         f"(tasks with teachers: {', '.join(with_teachers)})")
    if spec.teachers < 1:
        raise UsageError(f"--teachers {spec.teachers}: need at least one teacher")
    if chosen_by_hand:
        raise UsageError(f"--teachers {spec.teachers} and --set task.{knob}=... both choose the teachers: use one")
    return spec.teachers, knob
