"""What a trial may draw: the block families, each family's searched knobs, and ``train.*``/``model.*``
settings; by default every block and every knob with a declared range, adjusted by a space file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution,
                                  distribution_to_json)

from archbench.errors import UsageError, unknown
from archbench.knobs import base_type, knobs_of
from archbench.registry import BLOCKS, TASKS

SPACE_FILE_KEYS = ["blocks", "params", "defaults"]


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
    if not knob.searched:
        return None
    if knob.range is not None:
        low, high, log = knob.range.low, knob.range.high, knob.range.log
        if base is int:
            return IntDistribution(int(low), int(high), log=log)
        return FloatDistribution(float(low), float(high), log=log)
    if knob.choices:
        return CategoricalDistribution(list(knob.choices))
    return None


def build_space(task: str, preset: str, sets: dict, path: str | None) -> Space:
    """The default space (every block, every declared Range) adjusted by the space file at ``path``."""
    raw = _read_space_file(path) if path else {}
    blocks = raw.get("blocks", [e.name for e in BLOCKS.entries()])
    if not isinstance(blocks, list) or not blocks:
        raise UsageError(f"--space {path}: 'blocks' must be a non-empty list of block names")
    for b in blocks:
        BLOCKS.get(b)  # a typo gets close names
    # knobs the task's preset suggests or --set fixes are not searched
    fixed = set(TASKS.get(task).obj.presets.get(preset, {}).get("block", {})) | set(sets.get("block", {}))
    space = Space(blocks, {b: {} for b in blocks}, {b: {} for b in blocks})
    if raw.get("defaults", True):
        for b in blocks:
            space.params[b] = _declared_distributions(b, skip=fixed)
    space.params["*"] = {}
    for key, value in (raw.get("params") or {}).items():
        _add_space_entry(space, key, value)
    return space


def only_buildable(space: Space, task: str, preset: str, depths: list[int] | None, sets: dict) -> tuple[Space, dict]:
    """The space less the blocks that cannot be built at the study's depths at their default knobs
    (recurrent-depth and hourglass have no depth 1 or 2): a trial drawing one could only fail.
    Returns the space and ``{block: why}`` for those left out."""
    from archbench.config import EvalSpec, resolve_config

    left_out = {}
    for b in space.blocks:
        try:
            resolve_config(EvalSpec(block=b, task=task, preset=preset, depths=depths, sets=sets, plots=False))
        except UsageError as e:
            left_out[b] = str(e)
    if len(left_out) == len(space.blocks):
        raise UsageError(f"no block of the search space can be built at these depths ({next(iter(left_out.values()))})")
    kept = [b for b in space.blocks if b not in left_out]
    return dataclasses.replace(space, blocks=kept, params={b: p for b, p in space.params.items() if b not in left_out},
                               pinned={b: p for b, p in space.pinned.items() if b not in left_out}), left_out


def _read_space_file(path: str) -> dict:
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--space {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--space {path}: not valid TOML ({e})") from None
    extra = set(raw) - set(SPACE_FILE_KEYS)
    if extra:
        raise unknown(f"key in space file {path}", sorted(extra)[0], SPACE_FILE_KEYS)
    return raw


def _declared_distributions(block: str, skip: set[str]) -> dict[str, BaseDistribution]:
    """A block's knobs that declare a range or choices, less those in ``skip``."""
    params = {}
    for name, knob in BLOCKS.get(block).knobs.items():
        if name in skip:
            continue
        dist = knob_distribution(knob)
        if dist is not None:
            params[name] = dist
    return params


def _add_space_entry(space: Space, key: str, value: Any) -> None:
    """A ``[params]`` entry of the space file: ``train.KNOB``/``model.KNOB`` = a distribution sampled in
    every trial; ``BLOCK.KNOB`` = a distribution that replaces the default one, or a pinned value."""
    owner, dot, knob = key.partition(".")
    if not dot:
        raise UsageError(f"space entry {key!r}: expected BLOCK.KNOB, train.KNOB or model.KNOB")
    if owner in ("train", "model"):
        from archbench.config import ModelConfig
        from archbench.train import TrainConfig

        target = {"train": TrainConfig, "model": ModelConfig}[owner]
        if knob not in knobs_of(target):
            raise unknown("setting in space file", key, [f"{owner}.{k}" for k in knobs_of(target)])
        dist = _entry_distribution(key, value)
        if dist is None:
            raise UsageError(f"space entry {key!r}: pin train/model values with --set {key}={value}")
        space.params["*"][key] = dist
        return
    if owner not in space.params:
        raise unknown("block in space file (not in 'blocks')", owner, space.blocks)
    knobs = BLOCKS.get(owner).knobs
    if knob not in knobs:
        raise unknown(f"knob of block {owner!r}", key, [f"{owner}.{k}" for k in knobs])
    dist = _entry_distribution(key, value)
    if dist is None:
        space.params[owner].pop(knob, None)
        space.pinned[owner][knob] = value
    else:
        space.params[owner][knob] = dist


def _entry_distribution(where: str, value: Any) -> BaseDistribution | None:
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
