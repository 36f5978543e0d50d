"""Progress of long work, in a terminal and in a log file.

In a terminal, rich's live bars. Anywhere else (output redirected to a file, a cluster job) a live
display prints nothing until the end, so ``Progress`` prints a plain line per task every ``every``
seconds instead: what runs, how far, the loss (or whatever ``info`` says), speed and time left.
"""

from __future__ import annotations

import dataclasses
import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as _Rich
from rich.text import Text

from archbench.errors import UsageError


def every_s() -> float:
    """Seconds between progress lines when the output is not a terminal: $ARCHBENCH_PROGRESS_EVERY, else 10."""
    raw = os.environ.get("ARCHBENCH_PROGRESS_EVERY", "10")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise UsageError(f"ARCHBENCH_PROGRESS_EVERY={raw!r}: expected a number of seconds >= 0, like 10")
    return value


class _Speed(ProgressColumn):
    def render(self, task):
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else "")


@dataclasses.dataclass
class _Line:
    description: str
    total: float | None
    unit: str
    started: float
    completed: float = 0.0
    info: str = ""
    printed: float = 0.0


class Progress:
    """``add`` a task, ``update`` it, ``remove`` it; live bars in a terminal, timed lines elsewhere."""

    def __init__(self, console: Console, every: float | None = None):
        self.console = console
        self.every = every_s() if every is None else every
        self.live = console.is_terminal
        self._rich = _Rich(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Speed(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                           transient=True) if self.live else None
        self._lines: dict[int, _Line] = {}
        self._next = 0

    def __enter__(self) -> Progress:
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    def add(self, description: str, total: float | None, unit: str = "step") -> int:
        if self._rich is not None:
            return self._rich.add_task(description, total=total, info="", unit=unit)
        self._next += 1
        now = time.monotonic()
        self._lines[self._next] = _Line(description, total, unit, now, printed=now)
        return self._next

    def update(self, task: int, completed: float | None = None, info: str | None = None, advance: float = 0) -> None:
        if self._rich is not None:
            fields = {} if info is None else {"info": info}
            self._rich.update(task, completed=completed, advance=advance or None, **fields)
            return
        line = self._lines[task]
        line.completed = completed if completed is not None else line.completed + advance
        if info is not None:
            line.info = info
        now = time.monotonic()
        if now - line.printed >= self.every:
            line.printed = now
            self.console.print(self.describe(line, now), markup=False, highlight=False, soft_wrap=True)

    def remove(self, task: int) -> None:
        if self._rich is not None:
            self._rich.remove_task(task)
        else:
            self._lines.pop(task, None)

    @staticmethod
    def describe(line: _Line, now: float) -> str:
        elapsed = now - line.started
        speed = line.completed / elapsed if elapsed > 0 else 0.0
        parts = [f"{line.description}: {line.unit} {line.completed:,.0f}" +
                 (f"/{line.total:,.0f}" if line.total else "")]
        if line.info:
            parts.append(line.info)
        if speed:
            parts.append(f"{speed:,.1f} {line.unit}/s")
        parts.append(f"{_clock(elapsed)} elapsed")
        if speed and line.total:
            parts.append(f"~{_clock((line.total - line.completed) / speed)} left")
        return ", ".join(parts)


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
