"""Running on a Ray cluster (``--ray ADDRESS``): an eval sweep's runs, or a search's workers, as Ray tasks.

Ray rather than SLURM (through submitit) because it needs no scheduler installed by an administrator:
``pip install 'archbench[ray]'`` and ``ray start --head`` make a cluster of one machine, ``ray start
--address=HEAD:6379`` on others adds them, and on a SLURM site Ray's own recipe starts it inside an
allocation. Every node needs the same archbench (and plugin files, at the same paths).

- ``archbench eval --ray ADDRESS``: each run the sweep lacks is one task (one CPU, or one GPU with a CUDA
  ``--device``) that trains it in a scratch folder on its node and returns the record and weights; this
  process writes them to ``--runs-dir`` as they arrive, so records, resume and the result are exactly a
  local sweep's, and no shared file system is needed. An interrupted run restarts from its beginning.
- ``archbench search --ray ADDRESS --workers K``: the K search workers are tasks. They write the trials'
  run records to ``--runs-dir`` on their node, and talk to the study's storage: PostgreSQL across
  machines, SQLite or a journal file only where every node sees the same file system.
"""

from __future__ import annotations

import dataclasses
import io
import tempfile
from pathlib import Path

from archbench.errors import ArchbenchError, UsageError


def connect(address: str) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine is part of; ``HOST:PORT``;
    ``ray://HOST:10001``), once per process."""
    try:
        import ray
    except ModuleNotFoundError:
        raise UsageError(f"--ray {address}: Ray is not installed; install it with: pip install 'archbench[ray]'") from None
    if ray.is_initialized():
        return
    _reachable(address)
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"--ray {address}: cannot join a Ray cluster there ({first}); start one with "
                         f"'ray start --head' and give its address, e.g. --ray auto or --ray HOST:6379") from None


def _reachable(address: str) -> None:
    """Refuse at once an address nothing listens at (Ray itself would keep retrying for minutes)."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # auto, or a form Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise UsageError(f"--ray {address}: nothing answers at {host}:{port} ({e.strerror or e}); start a cluster "
                         f"with 'ray start --head' and give its address, e.g. --ray auto or --ray HOST:6379") from None


def resources(device: str) -> dict:
    """What one training task asks of the cluster."""
    return {"num_gpus": 1, "num_cpus": 1} if device.startswith("cuda") else {"num_cpus": 1}


def train_runs(sweep, runs: list, on_done) -> None:
    """Train ``runs`` (of ``sweep``, an ``archbench.sweep.Sweep``) as Ray tasks; ``on_done(run, record,
    weights)`` as each finishes, in this process. A task that fails is reported after the others end."""
    import ray

    from archbench.registry import PLUGIN_FILES

    remote = ray.remote(**resources(sweep.spec.device))(train_one)
    pending = {remote.remote(sweep.spec, run.key, list(PLUGIN_FILES)): run for run in runs}
    failed = []
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            run = pending.pop(done[0])
            try:
                record, weights = ray.get(done[0])
            except ray.exceptions.RayError as e:
                failed.append(f"{run.label}: {_first_line(e)}")
                continue
            on_done(run, record, weights)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    if failed:
        raise ArchbenchError(f"{len(failed)} run(s) failed on the Ray cluster ({failed[0]}); the others are saved: "
                             f"rerun the command to retry")


def train_one(spec, key: str, plugins: list[str]) -> tuple[dict, bytes]:
    """On a node: train run ``key`` of the sweep ``spec`` (with the per-model evaluators) in a scratch folder;
    its record (JSON) and weights (``torch.save`` bytes)."""
    from rich.console import Console

    from archbench.progress import Progress
    from archbench.registry import load_plugin_file
    from archbench.sweep import Sweep

    for path in plugins:
        load_plugin_file(path)
    with tempfile.TemporaryDirectory(prefix="archbench-ray-") as scratch:
        sweep = Sweep(dataclasses.replace(spec, runs_dir=scratch, out=None, ray=None),
                      Console(file=io.StringIO(), width=120))
        run = next((r for r in sweep.runs if r.key == key), None)
        if run is None:
            raise ArchbenchError(f"run {key} is not in this node's sweep: the node's archbench "
                                 f"({_version()}) differs from the submitting machine's")
        sweep.store.prepare()
        with Progress(sweep.console) as progress:
            record, model = sweep.train_one(run, progress)
        record = sweep.measure(record, model, run)
        return record.to_json(), Path(sweep.store.weights_path(key)).read_bytes()


def search_workers(spec, workers: int, remaining: int, work) -> tuple[list, object]:
    """Start ``workers`` Ray tasks of a search, each running ``work(spec, count, index)`` (the same loop as a
    local worker process), which take the ``remaining`` trials one at a time from one count (an actor), so
    that no node idles while another has trials queued; returns the tasks' references, to be waited on
    with ``wait_workers``, and the count (held while they run)."""
    import ray

    connect(spec.ray)
    count = ray.remote(num_cpus=0)(TrialCount).remote(remaining)
    remote = ray.remote(**resources(spec.device))(work)  # one CPU (or GPU) each, one torch thread
    return [remote.remote(spec, count, index) for index in range(min(workers, remaining))], count


class TrialCount:
    """The trials a search's Ray workers have left to start (a Ray actor: one ``take`` at a time)."""

    def __init__(self, left: int):
        self.left = left

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def wait_workers(refs: list, timeout: float) -> tuple[list, list[str]]:
    """The workers still running after up to ``timeout`` seconds, and the failures of those that ended."""
    import ray

    if not refs:
        return [], []
    done, running = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    failed = []
    for ref in done:
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            failed.append(_first_line(e))
    return running, failed


def cancel(refs: list) -> None:
    import ray

    for ref in refs:
        ray.cancel(ref)  # a KeyboardInterrupt in the task: the trial in hand is marked cut off


def _first_line(e: Exception) -> str:
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"


def _version() -> str:
    import archbench

    return archbench.__version__
