"""Run records: one small JSON file per finished run, keyed by a hash of everything that
determines the run, written atomically (temp file + rename) so a killed sweep leaves only
whole records behind. The trained weights sit beside the record (``<key>.pt``, loaded with
``weights_only=True``) so that per-model evaluators can run later on cached runs."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

RECORD_VERSION = 1


def run_key(determinants: dict) -> str:
    blob = json.dumps(determinants, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; records are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.dir = self.root / "records"

    def record_path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def weights_path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def checkpoint_path(self, key: str) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        return self.dir / f"{key}.ckpt.pt"

    def load(self, key: str) -> dict | None:
        path = self.record_path(key)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"ignoring unreadable run record {path}: {e}")
            return None
        if not isinstance(record, dict) or record.get("key") != key or record.get("record_version") != RECORD_VERSION:
            warnings.warn(f"ignoring run record {path}: not an archbench v{RECORD_VERSION} record for this run")
            return None
        return record

    def save(self, record: dict) -> Path:
        record = {"record_version": RECORD_VERSION, **record}
        path = self.record_path(record["key"])
        atomic_write_text(path, json.dumps(record, indent=1, sort_keys=True, default=str))
        return path
