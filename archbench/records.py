"""Run records: one small JSON file per finished run, and the store that keeps them.

A run's key is a hash of what determines its numbers (``run_spec``): block, task and their declared
``version``s, their resolved knobs, the model and training settings, depth, seed and archbench's own
``NUMERICS_VERSION``. Source hashes are provenance inside the record, never part of the key, so a
refactor or a comment retrains nothing; a change of numbers raises a ``version``.

``RunRecord`` is the one typed form of a record: it reads, validates and writes its JSON here and
nowhere else. ``RunStore`` keeps records (``records/<key>.json``), trained weights beside them
(``<key>.pt``, loaded with ``weights_only=True``) and training checkpoints, all written atomically
(unique temporary file, fsync, rename) so a killed process leaves only whole files behind. A record
that cannot be read is moved aside to ``records/corrupt/`` with a one-line warning and its run is
trained again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from archbench.errors import ArchbenchError

RECORD_VERSION = 2  # the record's JSON layout (1: keys made from source hashes; migrated on first use)
# Raised when archbench's shared numerics change (the training loops, the model wrapper, the optimizer
# and schedule plumbing): every run is trained again. A block's, task's or evaluator's own numbers
# are versioned by the ``version`` it registers with.
NUMERICS_VERSION = 1
FORMAT_MARKER = ".format"  # in a records folder: the record version its files were migrated to


def digest(obj: Any) -> str:
    """A short hash of ``obj``'s canonical JSON: run keys, cache and file names."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def run_spec(block, task, config, depth: int, seed: int) -> dict:
    """What determines a run's numbers (``block``/``task`` are registry entries, ``config`` a grid
    point's ``archbench.config.Config``); its digest is the run's key."""
    return {"numerics": NUMERICS_VERSION, "block": block.name, "block_version": block.version,
            "block_cfg": config.block, "task": task.name, "task_version": task.version, "task_cfg": config.task,
            "model": config.model, "train": config.train, "depth": depth, "seed": seed}


# the spec's fields and their JSON types
SPEC_TYPES = {"numerics": int, "block": str, "block_version": int, "block_cfg": dict, "task": str, "task_version": int,
              "task_cfg": dict, "model": dict, "train": dict, "depth": int, "seed": int}
SPEC_FIELDS = tuple(SPEC_TYPES)


class BadRecord(ValueError):
    """Why some JSON is not a usable run record (one line)."""


# ------------------------------------------------------------------------------------------ the record

_NUMBER = (int, float)


@dataclasses.dataclass
class RunRecord:
    """One finished run (trained, or failed with a reason)."""

    key: str
    spec: dict  # what determined the numbers (SPEC_FIELDS); digest(spec) == key
    depth: int  # as asked for: layers for a plain stack, the family's own depth argument otherwise
    effective_depth: int  # module applications in the forward pass
    seed: int
    status: str  # "ok" or "failed"
    final_loss: float | None  # held-out loss (the task's loss on fresh batches)
    params: int  # trainable parameters
    eval: dict  # the task's held-out metrics (loss, accuracy, ...)
    metrics: dict  # per-model evaluators: name -> result with the "knobs" and "version" it was measured with
    solved: bool | None  # the task's notion of solved (None where it has none)
    failure: str | None
    steps_done: int
    history: list  # [step, training loss] at every log point
    wall_s: float  # training time (a batched run's share of its batch)
    source: dict  # provenance: archbench version and the block's and task's source hashes
    env: dict  # versions, device, git commit
    engine: dict  # how it was trained: {"name": "plain"} or {"name": "batched", "runs": n, "wall_s": s}
    finished: str  # ISO time
    record_version: int = RECORD_VERSION
    # [step, held-out loss] every train.eval_every steps (empty when 0); optional in the file
    eval_history: list = dataclasses.field(default_factory=list, metadata={"optional": True})
    # where the run sits in the sweep that uses it: not stored
    vary: dict = dataclasses.field(default_factory=dict, metadata={"stored": False})
    teacher: int | None = dataclasses.field(default=None, metadata={"stored": False})  # under --teachers
    cached: bool = dataclasses.field(default=False, metadata={"stored": False})

    @property
    def block(self) -> str:
        return self.spec["block"]

    @property
    def task(self) -> str:
        return self.spec["task"]

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def replicate(self) -> tuple[int, str]:
        """Which replicate of its sweep the run belongs to: its seed and its task configuration (the teacher,
        on tasks with teachers). A bootstrap moves a replicate's runs at every depth together."""
        return self.seed, digest(self.spec.get("task_cfg", {}))

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("stored", True)}

    def summary(self) -> dict:
        """The run as a result JSON lists it."""
        keep = ("key", "depth", "effective_depth", "seed", "status", "final_loss", "solved", "failure", "params",
                "wall_s", "engine", "eval", "metrics", "vary", "teacher", "cached")
        return {k: getattr(self, k) for k in keep}

    @classmethod
    def from_json(cls, data: Any, key: str | None = None) -> RunRecord:
        """Validate ``data`` (a parsed record file, expected to hold run ``key``); ``BadRecord`` says why not."""
        if not isinstance(data, dict):
            raise BadRecord("not a JSON object")
        if data.get("record_version") != RECORD_VERSION:
            raise BadRecord(f"record_version {data.get('record_version')!r} (this archbench reads {RECORD_VERSION})")
        stored = [f for f in dataclasses.fields(cls) if f.metadata.get("stored", True)]
        for f in stored:
            if f.name not in data:
                if f.metadata.get("optional"):
                    continue
                raise BadRecord(f"no '{f.name}'")
            if not _has_type(data[f.name], _TYPES[f.name]):
                raise BadRecord(f"'{f.name}' has the wrong type ({type(data[f.name]).__name__})")
        if data["status"] not in ("ok", "failed"):
            raise BadRecord(f"status {data['status']!r} is neither 'ok' nor 'failed'")
        if data["status"] == "ok" and data["final_loss"] is None:
            raise BadRecord("a finished run without a final_loss")
        missing = [k for k in SPEC_FIELDS if k not in data["spec"]]
        if missing:
            raise BadRecord(f"its spec lacks {', '.join(missing)}")
        for name, types in SPEC_TYPES.items():
            if not _has_type(data["spec"][name], types):
                raise BadRecord(f"its spec's '{name}' has the wrong type ({type(data['spec'][name]).__name__})")
        for field, types in (("env", (str, type(None))), ("source", (str, type(None))),
                             ("eval", (*_NUMBER, type(None), list)), ("metrics", (dict, type(None)))):
            # a held-out metric is a number or, per position (word-problem's accuracy_by_position), a list of them
            bad = next((k for k, v in data[field].items() if not _has_type(v, types)
                        or (isinstance(v, list) and not all(_has_type(x, _NUMBER) for x in v))), None)
            if bad is not None:
                raise BadRecord(f"'{field}.{bad}' has the wrong type ({type(data[field][bad]).__name__})")
        for field in ("history", "eval_history"):
            points = data.get(field, [])
            if not all(isinstance(p, list) and len(p) == 2 and _has_type(p[0], int) and _has_type(p[1], _NUMBER)
                       for p in points):
                raise BadRecord(f"'{field}' is not a list of [step, loss]")
        if digest(data["spec"]) != data["key"]:
            raise BadRecord("its key is not the hash of its spec")
        if key is not None and data["key"] != key:
            raise BadRecord(f"its key {data['key']!r} does not match the file name")
        return cls(**{f.name: data[f.name] for f in stored if f.name in data})


_TYPES = {"key": str, "spec": dict, "depth": int, "effective_depth": int, "seed": int, "status": str,
          "final_loss": (*_NUMBER, type(None)), "params": int, "eval": dict, "metrics": dict,
          "solved": (bool, type(None)), "failure": (str, type(None)), "steps_done": int, "history": list,
          "wall_s": _NUMBER, "source": dict, "env": dict, "engine": dict, "finished": str, "record_version": int,
          "eval_history": list}


def _has_type(value, types) -> bool:
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        return False  # JSON true is not a number here
    return isinstance(value, types)


# ------------------------------------------------------------------------------------- atomic writing

class WriteError(ArchbenchError):
    """A file could not be written (a full disk, a read-only folder): which file, why, and the free space."""


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a unique temporary file beside ``path``, then rename it into place: readers
    see the old file or the whole new one, and concurrent writers never share a temporary name. A
    failure leaves no partial file and raises ``WriteError``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_OWNER}.", suffix=".tmp")
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}{free_space(path.parent)}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; these are ordinary files
        os.replace(tmp, path)
    except Exception as e:  # torch.save reports a full disk as RuntimeError, not OSError
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(f"cannot write {path}: {_why(e)}{free_space(path.parent)}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _why(e: Exception) -> str:
    if getattr(e, "strerror", None):
        return e.strerror
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def free_space(folder: Path) -> str:
    """"; N MB free there", or nothing when the folder's filesystem cannot be asked."""
    for p in (folder, *folder.parents):
        try:
            return f"; {shutil.disk_usage(p).free / 1e6:,.0f} MB free there"
        except OSError:
            continue
    return ""


# A temporary file's name carries its writer (host and pid), so that one a killed writer left behind
# can be told from one a live writer is still filling.
_HOST = socket.gethostname().replace(".", "_")
_OWNER = f"{_HOST}-{os.getpid()}"


def remove_stale_temporaries(folder: Path) -> None:
    """Delete the temporary files that writers on this host which are no longer running left in ``folder``."""
    for tmp in folder.glob(".*.tmp"):
        owner = tmp.name.rsplit(".", 3)[-3] if tmp.name.count(".") >= 4 else ""
        host, _, pid = owner.rpartition("-")
        if host == _HOST and pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str))


# -------------------------------------------------------------------------------------------- the store

class RunStore:
    """The records, weights and checkpoints under ``RUNS_DIR/records``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "records"
        if self.dir.is_dir():
            migrate(self)

    def record_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def weights_path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def checkpoint_path(self, key: str) -> Path:
        return self.dir / f"{key}.ckpt.pt"

    def load(self, key: str) -> RunRecord | None:
        """The record of run ``key``; None if there is none, or if it is unreadable (then it is moved aside)."""
        path = self.record_path(key)
        try:
            return RunRecord.from_json(json.loads(path.read_bytes()), key)
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, BadRecord) as e:
            set_aside(path, _reason(e), then="its run is trained again")
            return None

    def save(self, record: RunRecord) -> Path:
        if not (marker := self.dir / FORMAT_MARKER).exists():  # a new store: nothing to migrate, ever
            atomic_write_text(marker, f"{RECORD_VERSION}\n")
        path = self.record_path(record.key)
        write_json(path, record.to_json())
        return path

    def save_weights(self, key: str, state_dict: dict) -> None:
        import torch

        atomic_write(self.weights_path(key), lambda f: torch.save(state_dict, f))

    def prepare(self) -> None:
        """Before anything trains: the records folder takes a file (a read-only folder or a full disk fails
        here, in one line, not after the training) and the temporary files of killed writers are gone."""
        probe = self.dir / f".write-check.{_OWNER}"
        atomic_write_text(probe, "ok\n")
        probe.unlink()
        remove_stale_temporaries(self.dir)

    @contextlib.contextmanager
    def claim(self, key: str, wait: bool = True,
              on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
        """Hold run ``key``'s lock while training it, so that no other process trains it too.

        Yields True once held; with ``wait=False`` yields False at once if another process holds it
        (``on_wait(owner)`` is told who, before waiting). The lock is the operating system's
        (``flock`` on ``records/<key>.lock``): it dies with its process, so a lock file that a killed
        run left behind is simply taken over."""
        path = self.dir / f"{key}.lock"
        fd = _lock(path, block=False)
        if fd is None and wait:
            if on_wait is not None:
                on_wait(_lock_owner(path))
            fd = _lock(path, block=True)
        if fd is None:
            yield False
            return
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {datetime.datetime.now():%H:%M:%S}\n"
                     .encode())
            yield True
        finally:
            Path(path).unlink(missing_ok=True)  # before unlocking: a waiter then sees a new file, not this one
            os.close(fd)

    def scan(self) -> Iterator[tuple[Path, RunRecord | None, str | None]]:
        """Every record file: (path, record, None), or (path, None, why it is not usable). Reads only."""
        if not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("*.json")):
            try:
                yield path, RunRecord.from_json(json.loads(path.read_bytes()), path.stem), None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, BadRecord) as e:
                yield path, None, _reason(e)


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, BadRecord) else f"unreadable: {type(e).__name__}"


def set_aside(path: Path, why: str, then: str = "") -> None:
    """Move a file that cannot be used to ``corrupt/`` beside it (never delete what a person may want),
    with a one-line warning."""
    aside = path.parent / "corrupt" / f"{path.name}.{datetime.datetime.now():%Y%m%dT%H%M%S%f}"
    try:
        aside.parent.mkdir(exist_ok=True)
        os.replace(path, aside)
        where = f"moved to {aside}"
    except OSError as e:
        where = f"could not move it aside ({e.strerror or e})"
    warnings.warn(f"{path} is unusable ({why}); {where}" + (f"; {then}" if then else ""))


def read_checkpoint(path: Path, device) -> dict | None:
    """A training checkpoint (None if there is none; an unreadable one is set aside: its run starts over)."""
    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
                not isinstance(state.get("model"), dict):
            raise BadRecord("not a training checkpoint")
        return state
    except Exception as e:  # truncated, foreign, or not a pickle at all
        set_aside(path, _reason(e), then="its run starts again from step 0")
        return None


def _lock(path: Path, block: bool) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing): its file descriptor, or None if held elsewhere."""
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)  # its holder removed the file as it let go: lock the one that stands there now


def _lock_owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "another process"
    except OSError:
        return "another process"


# ---------------------------------------------------------------------------------------- migration

def migrate(store: RunStore) -> int:
    """Rewrite the store's version-1 records (keyed by source hashes) under version-2 keys; returns how many.

    Every entry was at version 1 when versions were introduced, so an old record counts as made at
    version 1 of its block and task; its source hashes move to ``source``, where ``archbench
    leaderboard`` notes rows made by other source than today's. Weights and checkpoints follow.
    """
    marker = store.dir / FORMAT_MARKER
    try:
        if marker.read_text().strip() == str(RECORD_VERSION):
            return 0
    except OSError:
        pass
    moved = 0
    for path in sorted(store.dir.glob("*.json")):
        try:
            old = json.loads(path.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # left for load() to set aside
        if not isinstance(old, dict) or old.get("record_version") != 1 or not isinstance(old.get("spec"), dict):
            continue
        new = migrate_record(old)
        if new is None:
            continue
        try:  # the new record first: where it cannot be written, nothing has moved
            write_json(store.record_path(new["key"]), new)
            for suffix in (".pt", ".ckpt.pt"):
                src = path.with_name(path.stem + suffix)
                if src.exists():
                    os.replace(src, store.dir / f"{new['key']}{suffix}")
            if new["key"] != path.stem:
                path.unlink(missing_ok=True)
        except OSError:
            continue  # a read-only store (a leaderboard reading it): left as it is, skipped as version 1
        moved += 1
    try:
        atomic_write_text(marker, f"{RECORD_VERSION}\n")
    except OSError:
        pass  # a read-only store: migrate again next time
    if moved:
        warnings.warn(f"{store.dir}: {moved} run record(s) from before versioned keys rewritten as version "
                      f"{RECORD_VERSION} (their source hashes are kept as provenance)")
    return moved


def migrate_record(old: dict) -> dict | None:
    """A version-1 record as a version-2 one (None if it lacks what that needs)."""
    s = old["spec"]
    if any(k not in s for k in ("block", "block_cfg", "task", "task_cfg", "model", "train", "depth", "seed")):
        return None
    spec = {"numerics": 1, "block": s["block"], "block_version": 1, "block_cfg": s["block_cfg"], "task": s["task"],
            "task_version": 1, "task_cfg": s["task_cfg"], "model": s["model"], "train": s["train"],
            "depth": s["depth"], "seed": s["seed"]}
    new = {k: v for k, v in old.items() if k not in ("block", "task")}
    new.setdefault("engine", {"name": "plain"})  # records from before the batched engine
    new.update(key=digest(spec), spec=spec, record_version=RECORD_VERSION,
               source={"archbench": s.get("archbench"), "block": s.get("block_source"), "task": s.get("task_source")},
               metrics={name: {**m, "version": 1} if isinstance(m, dict) else m
                        for name, m in (old.get("metrics") or {}).items()})
    return new
