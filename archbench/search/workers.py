"""Running a search: ``run_search`` continues the study up to ``--trials`` trials, in this process or in
``--workers K`` spawned processes that split the remaining trials between them."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Callable

import optuna
from optuna.trial import TrialState

from archbench.errors import ArchbenchError, UsageError
from archbench.registry import BLOCKS
from archbench.search.failures import TrialFailed
from archbench.search.figures import write_figures
from archbench.search.results import summary
from archbench.search.space import Space, build_space, only_buildable
from archbench.search.study import SearchSpec, counted, enqueue_baseline, open_storage, open_study, resume
from archbench.search.trial import TrialRunner

_ENDED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def run_search(spec: SearchSpec, console=None, on_trial: Callable | None = None) -> dict:
    """Run (or continue) the study until it has ``spec.trials`` trials; returns ``summary(...)``."""
    if spec.trials < 1:
        raise UsageError(f"--trials {spec.trials}: need at least one trial")
    if spec.workers < 1:
        raise UsageError(f"--workers {spec.workers}: need at least one worker")
    if spec.baseline:
        BLOCKS.get(spec.baseline)
    space, left_out = study_space(spec)
    runner = TrialRunner(spec, space, console)  # a bad task, preset, objective or budget fails here, before any write
    study = open_study(spec, space)
    if console is not None:
        for block, why in left_out.items():
            console.print(f"left out of the search space: {block} ({why})", soft_wrap=True)
    resume(study)
    if spec.baseline:
        enqueue_baseline(study, space, spec.baseline)
    remaining = spec.trials - counted(study)
    if remaining > 0:
        if spec.workers == 1 and not spec.ray:
            _work(spec, space, remaining, runner, on_trial)
        else:
            _spawn(spec, remaining, on_trial)
    study = open_study(spec, space)
    return {**summary(study, spec), "figures": write_figures(study, spec)}


def study_space(spec: SearchSpec) -> tuple[Space, dict]:
    """The study's search space, and the blocks left out of it (those that cannot be built at its depths)."""
    return only_buildable(build_space(spec.task, spec.preset, spec.sets, spec.space), spec.task, spec.preset,
                          spec.depths, spec.sets)


def _work(spec: SearchSpec, space: Space, share, runner: TrialRunner, on_trial=None) -> None:
    """Run trials while ``share`` allows: a number of trials, or a count shared with this machine's other
    workers (``multiprocessing.Value``), from which each takes one trial at a time."""
    study = open_study(spec, space, pruner=runner.pruner())
    callbacks = [lambda s, t: on_trial(t)] if on_trial else []
    take = _taker(share)
    while take():
        if counted(study) >= spec.trials:  # other machines on a shared database may have filled it
            break
        study.optimize(runner, n_trials=1, catch=(TrialFailed,), callbacks=callbacks)


def _taker(share) -> Callable[[], bool]:
    """Whether this worker may start one more trial, from its own share (an int) or from the count all
    workers share (a ``multiprocessing.Value`` on one machine, a ``cluster.TrialCount`` actor on Ray), so
    that none idles while another still has trials queued behind its own."""
    if isinstance(share, int):
        left = iter(range(share))
        return lambda: next(left, None) is not None
    if hasattr(share, "take"):  # a Ray actor
        import ray

        return lambda: ray.get(share.take.remote())

    def take() -> bool:
        with share.get_lock():
            if share.value <= 0:
                return False
            share.value -= 1
            return True
    return take


def _worker_main(spec: SearchSpec, share, index: int, parent: int) -> None:
    """One of ``--workers K`` processes on this machine (spawned, so CUDA is safe), taking trials from
    the count they share."""
    stop_with(parent)
    _worker(spec, share, index, threads=threads_each(spec.workers))


def threads_each(processes: int) -> int:
    """Torch threads for each of ``processes`` training side by side on this machine: its share of the cores."""
    return max(1, (os.cpu_count() or 1) // processes)


def _worker(spec: SearchSpec, share, index: int, threads: int = 1) -> None:
    """A worker's loop, in a process of its own here or a Ray task (archbench.cluster): trials while
    ``share`` allows (``_work``), its output in ``STUDY_DIR/worker-INDEX.log``."""
    import torch

    from archbench.registry import load_plugin_file

    torch.set_num_threads(threads)
    for path in spec.plugins:
        load_plugin_file(path)
    spec = dataclasses.replace(spec, seed=spec.seed + 1000 * (index + 1))  # workers draw different startups
    from rich.console import Console

    spec.study_dir.mkdir(parents=True, exist_ok=True)
    with open(spec.study_dir / f"worker-{index}.log", "a", buffering=1) as log:
        sys.stdout = sys.stderr = log  # warnings and tracebacks go to the worker's log, not the terminal
        try:
            space, _ = study_space(spec)
            _work(spec, space, share, TrialRunner(spec, space, Console(file=log, force_terminal=False, width=120)))
        except KeyboardInterrupt:  # the trial in hand is marked cut off; a rerun queues it again
            pass
        finally:
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


STOP_GRACE_S = 20.0  # after the interrupt, how long a worker whose parent is gone may take to stop


def stop_with(parent: int) -> None:
    """Interrupt this worker, as Ctrl-C would, once the process that started it is gone (killed with -9, say),
    so that no worker trains on for a command nobody is running."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(STOP_GRACE_S)
        os._exit(130)  # the interrupt was lost (caught inside a library): a rerun finds this pid dead, trial cut off

    # a command started in the background (nohup, `&` in a script) ignores SIGINT, and its workers with it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=watch, daemon=True).start()


def _spawn(spec: SearchSpec, remaining: int, on_trial=None) -> None:
    """K workers run the remaining trials, exactly that many (none twice, none left over): processes on this
    machine or tasks on the Ray cluster at ``--ray``, taking one trial at a time from a count they share;
    this process reports each trial as it ends."""
    spec.study_dir.mkdir(parents=True, exist_ok=True)
    if spec.ray:
        workers = _RayWorkers(spec, remaining)
    else:
        workers = _LocalWorkers(spec, remaining)
    storage = open_storage(spec.storage_url, heartbeat=False)
    seen: set[int] = {t.number for t in optuna.load_study(study_name=spec.study_name, storage=storage)
                      .get_trials(deepcopy=False, states=_ENDED)}
    try:
        while True:
            alive = workers.alive()
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
        workers.stop()
        raise
    if workers.failures:
        raise ArchbenchError(f"{len(workers.failures)} search worker(s) failed ({workers.failures[0]}); see "
                             f"{spec.study_dir}/worker-*.log; rerun the command to continue the study")


class _LocalWorkers:
    def __init__(self, spec: SearchSpec, remaining: int):
        ctx = multiprocessing.get_context("spawn")
        self.left = ctx.Value("i", remaining)  # held here: the children open it after this returns
        self.procs = [ctx.Process(target=_worker_main, args=(spec, self.left, i, os.getpid()), daemon=False)
                      for i in range(min(spec.workers, remaining))]
        for p in self.procs:
            p.start()

    def alive(self) -> bool:
        return any(p.is_alive() for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.join(timeout=30)  # each worker got the same SIGINT and marks its trial cut off

    @property
    def failures(self) -> list[str]:
        return [f"exit code {p.exitcode}" for p in self.procs if p.exitcode not in (0, None)]


class _RayWorkers:
    def __init__(self, spec: SearchSpec, remaining: int):
        from archbench import cluster

        self.cluster, self.failures = cluster, []
        self.running, self.count = cluster.search_workers(spec, spec.workers, remaining, _worker)

    def alive(self) -> bool:
        self.running, failed = self.cluster.wait_workers(self.running, timeout=0)
        self.failures += failed
        return bool(self.running)

    def stop(self) -> None:
        self.cluster.cancel(self.running)  # a KeyboardInterrupt in each: its trial is marked cut off
        self.cluster.wait_workers(self.running, timeout=30)
