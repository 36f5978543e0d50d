"""A study: the search's settings (``SearchSpec``), where its trials are stored, and resuming it (trials
cut off by an interruption or a dead worker are queued again)."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import typing
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

import archbench
from archbench.errors import UsageError
from archbench.registry import BLOCKS
from archbench.search.failures import FAILURE
from archbench.search.objectives import OBJECTIVES
from archbench.search.space import Space


@dataclasses.dataclass
class SearchSpec:
    task: str = "hop-induction"
    trials: int = 30
    study: str | None = None
    storage: str | None = None
    objectives: list[str] = dataclasses.field(default_factory=lambda: ["compose", "lm-loss"])
    space: str | None = None
    workers: int = 1
    preset: str = "search"
    depths: list[int] | None = None
    seeds: int | None = None
    sets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    budget: typing.Literal["params", "flops", "none"] = "params"
    baseline: str | None = "residual"
    pruner: typing.Literal["median", "hyperband", "sha", "none"] = "median"
    seed: int = 0
    device: str = "auto"
    runs_dir: str = "runs"
    plugins: list[str] = dataclasses.field(default_factory=list)
    ray: str | None = None  # a Ray cluster's address: the workers run there (archbench.cluster)

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
            storage = (_SQLiteStorage if url.startswith("sqlite:///") else optuna.storages.RDBStorage)(url, **kwargs)
    except ModuleNotFoundError as e:
        raise UsageError(f"--storage {url!r}: the database driver is missing ({e.name}); "
                         f"install it with: pip install 'archbench[postgres]'") from None
    except Exception as e:  # sqlalchemy's connection errors: say which URL
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "import" in first.lower():
            first += "; for PostgreSQL: pip install 'archbench[postgres]'"
        raise UsageError(f"--storage {url!r}: cannot open ({first})") from None
    return storage


class _SQLiteStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose trial-state changes take a file lock beside the database. Optuna takes a
    queued trial by reading WAITING, then writing RUNNING, relying on SELECT … FOR UPDATE, which SQLite
    ignores: without the lock two workers could both take the same queued trial. (A lock around this
    one call, not the whole database: a worker interrupted mid-transaction must not leave it locked.)"""

    def __init__(self, url: str, **kwargs):
        super().__init__(url, **kwargs)
        self._lock_path = url.removeprefix("sqlite:///") + ".lock"

    def set_trial_state_values(self, trial_id, state, values=None):
        import fcntl

        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
            return super().set_trial_state_values(trial_id, state, values)


def search_config(spec: SearchSpec, space: Space) -> dict:
    """What a study is: a rerun under the same name must match it."""
    return {"task": spec.task, "preset": spec.preset, "depths": spec.depths, "seeds": spec.seeds,
            "sets": spec.sets, "objectives": spec.objectives, "budget": spec.budget, "baseline": spec.baseline,
            "space": space.to_json()}


STEP_PRUNERS = ("hyperband", "sha")  # their resource is training steps (held-out metrics every train.eval_every)


def make_pruner(spec: SearchSpec, first_step: int = 1) -> optuna.pruners.BasePruner:
    """``--pruner``: median (resource: depths finished), Hyperband or successive halving (resource: training
    steps, from the first in-training evaluation on), none; multi-objective studies are not pruned."""
    if len(spec.objectives) > 1 or spec.pruner == "none":
        return optuna.pruners.NopPruner()
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=first_step, max_resource="auto", reduction_factor=3)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_step, reduction_factor=3)


def open_study(spec: SearchSpec, space: Space, storage=None, pruner=None) -> optuna.Study:
    directions = [OBJECTIVES[o].direction for o in spec.objectives]
    storage = storage or open_storage(spec.storage_url)
    with warnings.catch_warnings():  # multivariate/group (conditional spaces) are marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=spec.seed, multivariate=True, group=True, constant_liar=True,
                                             n_startup_trials=min(10, max(2, spec.trials // 3)))
    pruner = pruner or make_pruner(spec)
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


def resume(study: optuna.Study) -> None:
    """Mark the trials an earlier run left RUNNING as cut off (a killed process, a worker whose
    heartbeat stopped), and queue every cut-off trial again."""
    with warnings.catch_warnings():  # fail_stale_trials is marked experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # RUNNING trials whose heartbeat stopped
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if _dead_here(t.user_attrs.get("worker", "")):  # killed before its first heartbeat
            study.tell(t.number, state=TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        requeue(study, t)


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
