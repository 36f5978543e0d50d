"""Knobs: the typed, defaulted keyword arguments of a block, task, evaluator or config.

One mechanism serves every configurable thing in archbench: a knob is a keyword
parameter of a class's ``__init__`` (dataclasses included) that has a default.
Its annotation gives the type that ``--set section.name=value`` is parsed into,
optionally a range that a search may sample, and the values that make sense at all (``Bounds``;
anything outside them is refused before a run starts)::

    def __init__(self, dim, layer_idx, depth, *, mlp_ratio: Annotated[int, Range(1, 8), POSITIVE] = 4): ...
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from typing import Any, Literal, get_args, get_origin

from archbench.errors import UsageError, unknown

# Constructor arguments that archbench supplies itself; never knobs.
RESERVED = {"self", "dim", "layer_idx", "depth", "device", "seed"}


@dataclasses.dataclass(frozen=True)
class Range:
    """Sampling range of a numeric knob; ``log`` for scale parameters such as lr."""

    low: float
    high: float
    log: bool = False


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric knob may take at all (a search samples inside its ``Range``, a narrower set)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded

    def check(self, value: Any, where: str) -> None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        if too_low or too_high or (isinstance(value, float) and math.isinf(value)):
            raise UsageError(f"{where}={value:g} is out of range: expected {self}")

    def __str__(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = None if self.high is None else f"<= {self.high:g}"
        return " and ".join(p for p in (low, high) if p) or "a finite number"


class _NotSearched:
    def __repr__(self):
        return "NOT_SEARCHED"


# metadata of a knob that changes how, not what, is computed (an attention kernel): a search leaves it alone
NOT_SEARCHED = _NotSearched()
POSITIVE = Bounds(0, low_open=True)  # sizes, counts, rates
NON_NEGATIVE = Bounds(0)  # 0 means "off" (weight decay, eval_every, ...)
FRACTION = Bounds(0, 1)


@dataclasses.dataclass(frozen=True)
class Knob:
    name: str
    type: Any  # int, float, bool, str, a Literal[...], or Optional of those
    default: Any
    range: Range | None = None
    bounds: Bounds | None = None
    searched: bool = True  # False: NOT_SEARCHED, even with Literal choices

    @property
    def choices(self) -> tuple | None:
        base = base_type(self.type)
        return get_args(base) if get_origin(base) is Literal else None

    @property
    def item_type(self) -> Any | None:
        """The element type of a list knob (``tuple[int, ...]``, set as ``1,2,4``); None otherwise."""
        base = base_type(self.type)
        return get_args(base)[0] if get_origin(base) in (tuple, list) and get_args(base) else None

    def grid(self, text: Any, owner: str) -> list | None:
        """The values of a sweep written ``a,b,c`` (None if ``text`` is one value): every knob but a
        list knob reads commas as a sweep."""
        if not isinstance(text, str) or "," not in text or self.item_type is not None:
            return None
        return [self.parse(part.strip(), owner) for part in text.split(",") if part.strip()]

    def describe_type(self) -> str:
        if self.item_type is not None:
            return f"{getattr(self.item_type, '__name__', self.item_type)},..."
        if self.choices:
            return "|".join(str(c) for c in self.choices)
        base = base_type(self.type)
        name = getattr(base, "__name__", str(base))
        return name + ("|None" if _is_optional(self.type) else "")

    def parse(self, text: Any, owner: str) -> Any:
        """Parse a command-line string into this knob's type (values already typed pass through) and check it
        against the knob's ``Bounds``."""
        value = self._parse(text, owner)
        if self.bounds is not None:
            for v in value if isinstance(value, (tuple, list)) else (value,):
                self.bounds.check(v, f"{owner}.{self.name}")
        return value

    def _parse(self, text: Any, owner: str) -> Any:
        where = f"{owner}.{self.name}"
        if not isinstance(text, str):
            return text
        if _is_optional(self.type) and text.lower() in ("none", "null"):
            return None
        base = base_type(self.type)
        if self.item_type is not None:
            item = Knob(self.name, self.item_type, None)
            return get_origin(base)(item.parse(part.strip(), owner) for part in text.split(",") if part.strip())
        if self.choices:
            for c in self.choices:
                if str(c) == text:
                    return c
            raise unknown(f"value for {where}", text, [str(c) for c in self.choices])
        try:
            if base is bool:
                low = text.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if base is int:
                value = float(text)
                if not value.is_integer():
                    raise ValueError
                return int(value)
            if base is float:
                value = float(text)
                if math.isnan(value):
                    raise ValueError
                return value
        except ValueError:
            raise UsageError(f"{where}={text!r} is not a valid {self.describe_type()}") from None
        return text


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (typing.Union, types.UnionType) and type(None) in get_args(tp)


def base_type(tp: Any) -> Any:
    """The type a knob's values have: its annotation without ``Annotated`` metadata and without
    ``None`` (``Annotated[int, Range(1, 8)]`` and ``int | None`` are ``int``)."""
    if get_origin(tp) is typing.Annotated:
        tp = get_args(tp)[0]
    if _is_optional(tp):
        rest = [a for a in get_args(tp) if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return tp


def knobs_of(obj: Any) -> dict[str, Knob]:
    """The knobs of a class or callable, in declaration order.

    A class that passes ``**kwargs`` on to a shared part lists it in ``knobs_from`` so that the
    part's knobs are its own too (e.g. every gated block forwards the transformer-branch knobs);
    ``knobs_pinned`` names the part's knobs that the class fixes and does not offer.
    """
    own: dict[str, Knob] = {}
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable annotations in a user's file: fall back to the defaults' types
        hints = {}
    for p in inspect.signature(target).parameters.values():
        if p.name in RESERVED or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        tp = hints.get(p.name, type(p.default) if p.default is not None else str)
        rng = bounds = None
        searched = True
        if get_origin(tp) is typing.Annotated:
            rng = next((m for m in get_args(tp)[1:] if isinstance(m, Range)), None)
            bounds = next((m for m in get_args(tp)[1:] if isinstance(m, Bounds)), None)
            searched = not any(m is NOT_SEARCHED for m in get_args(tp)[1:])
            tp = get_args(tp)[0]
        own[p.name] = Knob(p.name, tp, p.default, rng, bounds, searched)
    shared: dict[str, Knob] = {}
    for part in getattr(obj, "knobs_from", ()):
        shared.update(knobs_of(part))
    for name in getattr(obj, "knobs_pinned", ()):  # a part's knob the class fixes (e.g. attention=True)
        shared.pop(name, None)
    out = {**own, **{k: v for k, v in shared.items() if k not in own}}  # the class's own knobs first
    return out


def resolve(obj: Any, owner: str, overrides: dict[str, Any], grid: dict[str, list] | None = None) -> dict[str, Any]:
    """Defaults of ``obj``'s knobs updated by ``overrides`` (parsed, checked against the names).

    An override written ``a,b,c`` is a sweep: with ``grid`` given, its values go to
    ``grid["owner.name"]`` and the first stands in the result; without, it is an error."""
    knobs = knobs_of(obj)
    values = {k.name: k.default for k in knobs.values()}
    for name, raw in overrides.items():
        if name not in knobs:
            raise unknown(f"setting for {owner}", f"{owner}.{name}", [f"{owner}.{k}" for k in knobs])
        sweep = knobs[name].grid(raw, owner)
        if sweep is not None and grid is None:
            raise UsageError(f"{owner}.{name}={raw!r}: one value expected here, not a sweep")
        if sweep is not None:
            grid[f"{owner}.{name}"] = sweep
            values[name] = sweep[0]
        else:
            values[name] = knobs[name].parse(raw, owner)
    return values
