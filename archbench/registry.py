"""One registry type for blocks, tasks and evaluators.

Register by decorator, look up by name (a typo gets the closest names), list
with wildcards. Entries come from the built-in plugin packages
(``archbench.blocks``, ``archbench.tasks``, ``archbench.evaluators``), from
installed packages' entry points (groups of the same names) and from user files
passed with ``--plugins FILE.py``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from archbench.errors import ArchbenchError, UsageError, unknown
from archbench.knobs import Knob, knobs_of


@dataclasses.dataclass
class Entry:
    name: str
    obj: Any
    description: str
    family: str = ""
    citation: str = ""
    # raised whenever the entry's numbers change (its runs are keyed on it, so they train again);
    # a refactor or a comment keeps it, and keeps every cached run
    version: int = 1
    extra: dict = dataclasses.field(default_factory=dict)  # kind-specific metadata (e.g. identity_init)

    @property
    def knobs(self) -> dict[str, Knob]:
        return knobs_of(self.obj)

    @property
    def source_hash(self) -> str:
        """Hash of the source file that defines the entry: provenance in each run record (never part
        of a run's key), so a table can say when its rows were made by other source than today's."""
        try:
            src = inspect.getsource(inspect.getmodule(self.obj))
        except (OSError, TypeError):
            src = f"{getattr(self.obj, '__module__', '')}.{getattr(self.obj, '__qualname__', self.name)}"
        return hashlib.sha256(src.encode()).hexdigest()[:16]


class Registry:
    def __init__(self, kind: str, builtin_package: str):
        self.kind = kind  # "block", "task", "evaluator"
        self.group = f"archbench.{kind}s"  # entry-point group
        self._builtin = builtin_package
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str | None = None, *, description: str | None = None, family: str = "",
                 citation: str = "", version: int | None = None, **extra: Any) -> Callable:
        """Decorator: ``@archbench.register_block("my-block", version=2)``.

        ``version`` (default: the object's ``version`` attribute, else 1) is part of every run's key:
        raise it when a change alters the entry's numbers."""

        def deco(obj):
            key = name or obj.__name__
            old = self._entries.get(key)
            if old is not None and _qualname(old.obj) != _qualname(obj):
                raise ArchbenchError(f"{self.kind} {key!r} is already registered by {_qualname(old.obj)}; "
                                     f"choose another name for {_qualname(obj)}")
            doc = description or _first_sentence(inspect.getdoc(obj) or "")
            v = version if version is not None else getattr(obj, "version", 1)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ArchbenchError(f"{self.kind} {key!r}: version must be a positive integer, not {v!r}")
            self._entries[key] = Entry(key, obj, doc, family, citation, v, extra)
            obj.registry_name = key
            return obj

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtin)
        for ep in importlib.metadata.entry_points(group=self.group):
            try:
                obj = ep.load()
            except Exception as e:  # a broken third-party package must not take the CLI down
                warnings.warn(f"archbench: entry point {ep.name!r} ({ep.value}) failed to load: {e}")
                continue
            if ep.name not in self._entries and not inspect.ismodule(obj):
                self.register(ep.name)(obj)

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise unknown(self.kind, name, self._entries)
        return self._entries[name]

    def names(self, pattern: str = "*") -> list[str]:
        self._load()
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def entries(self, pattern: str = "*") -> list[Entry]:
        return [self._entries[n] for n in self.names(pattern)]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


BLOCKS = Registry("block", "archbench.blocks")
TASKS = Registry("task", "archbench.tasks")
EVALUATORS = Registry("evaluator", "archbench.evaluators")
REGISTRIES = {"blocks": BLOCKS, "tasks": TASKS, "evaluators": EVALUATORS}

register_block = BLOCKS.register
register_task = TASKS.register
register_evaluator = EVALUATORS.register


PLUGIN_FILES: list[str] = []  # the plugin files this process loaded, for workers elsewhere (archbench.cluster)


def load_plugin_file(path: str | Path) -> None:
    """Import a user's plugin file so that its decorators register their entries (once per process)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"--plugins {str(path)!r} is a folder; give the plugin's .py file")
    if not path.is_file():
        raise UsageError(f"--plugins {str(path)!r}: no such file")
    # Built-ins first, so that a plugin cannot be shadowed by a later lazy load.
    for reg in REGISTRIES.values():
        reg._load()
    mod_name = "archbench_plugin_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if mod_name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        line = _error_line(e, path)
        raise ArchbenchError(f"plugin {str(path)!r} failed to import: {type(e).__name__}: {e}{line}") from None
    if str(path.resolve()) not in PLUGIN_FILES:
        PLUGIN_FILES.append(str(path.resolve()))


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _error_line(e: BaseException, path: Path) -> str:
    tb = e.__traceback__
    lineno = None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            lineno = tb.tb_lineno
        tb = tb.tb_next
    if isinstance(e, SyntaxError):  # its message names the line already
        return ""
    return f" (line {lineno})" if lineno else ""


def _first_sentence(doc: str) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    head, dot, _ = para.partition(". ")
    return head + "." if dot else para
