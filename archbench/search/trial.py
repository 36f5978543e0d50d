"""One trial, the objective function Optuna calls: sample a configuration, fit it to the budget, run
its eval sweep, score it. A trial that cannot be scored is marked FAIL with its reason."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time

import optuna

from archbench.errors import UsageError
from archbench.registry import TASKS
from archbench.search.budget import fit_width, measure
from archbench.search.failures import FAILURE, TrialFailed
from archbench.search.objectives import OBJECTIVES, STEPWISE, intermediate_value, objective_value, stepwise_value
from archbench.search.space import Space, sample
from archbench.search.study import STEP_PRUNERS, SearchSpec, make_pruner


@dataclasses.dataclass
class Sweep:
    """One eval sweep of a trial: a task (at the study's --preset) and the objectives measured on it."""

    task: str
    objectives: list[str]
    own: bool  # the study's own --task (its --depths and task.* settings apply)
    limit: int | None = None  # the budget at the largest depth, measured on the baseline (None: no budget)
    max_depth: int = 0
    ref_width: int = 0
    task_obj: object = None  # the task, built on the CPU


def sweeps(spec: SearchSpec) -> list[Sweep]:
    """The trial's sweeps: the study's task, then each other task an objective is measured on."""
    out: dict[str, Sweep] = {}
    for o in spec.objectives:
        task = OBJECTIVES[o].task or spec.task
        out.setdefault(task, Sweep(task, [], own=task == spec.task)).objectives.append(o)
    return sorted(out.values(), key=lambda s: not s.own)


class TrialRunner:
    """The objective function: one trial = sample, fit the budget, run the eval sweep(s), score it."""

    def __init__(self, spec: SearchSpec, space: Space, console=None):
        import torch

        from archbench.config import resolve_config
        from archbench.sweep import make_task

        self.spec, self.space, self.console = spec, space, console
        self.sweeps = sweeps(spec)
        self.by_steps = spec.pruner in STEP_PRUNERS and len(spec.objectives) == 1
        if spec.pruner in STEP_PRUNERS and len(spec.objectives) > 1:
            raise UsageError(f"--pruner {spec.pruner}: Optuna prunes single-objective studies only; name one "
                             f"--objective, or use --pruner none")
        if self.by_steps and spec.objectives[0] not in STEPWISE:
            raise UsageError(f"--pruner {spec.pruner}: objective {spec.objectives[0]} has no value during training "
                             f"(those that do: {', '.join(STEPWISE)}); use --pruner median or none")
        # the median pruner needs the depths one after another (the batched engine trains them together); the
        # step pruners want them together, to read every depth at each step
        self.engine = "plain" if spec.pruner == "median" and len(spec.objectives) == 1 else "auto"
        self.eval_every = None
        for sw in self.sweeps:
            # the baseline's resolved config checks task, preset, --set and the objectives' evaluators up front
            ref = resolve_config(self._eval_spec(sw, spec.baseline or "residual", self._sets(sw, {})))
            sw.ref_width, sw.max_depth = ref.model["width"], max(ref.depths)
            sw.task_obj = make_task(TASKS.get(sw.task), ref.task, torch.device("cpu"))  # budget, headline metric
            if self.by_steps and spec.objectives[0] in sw.objectives:
                self.eval_every = ref.train["eval_every"] or max(1, ref.train["steps"] // 10)
            if spec.budget != "none":
                sw.limit = measure(spec.baseline or "residual", ref, sw.max_depth, sw.task_obj, sw.ref_width,
                                   spec.budget)

    def _eval_spec(self, sw: Sweep, block: str, sets: dict):
        from archbench.config import EvalSpec

        spec = self.spec
        evaluators = sorted({e for o in sw.objectives for e in OBJECTIVES[o].evaluators})
        return EvalSpec(block=block, task=sw.task, preset=spec.preset, depths=spec.depths if sw.own else None,
                        seeds=spec.seeds, sets=sets, evaluators=evaluators, device=spec.device,
                        runs_dir=spec.runs_dir, plots=False, engine=self.engine)

    def _sets(self, sw: Sweep, sampled: dict) -> dict:
        """--set values (task.* only on the study's own task), then the sampled ones; with a step pruner, the
        objective's sweep evaluates along the way."""
        sets = {section: dict(values) for section, values in self.spec.sets.items() if sw.own or section != "task"}
        for section, values in sampled.items():
            sets.setdefault(section, {}).update(values)
        if self.eval_every and self.spec.objectives[0] in sw.objectives:
            sets.setdefault("train", {}).setdefault("eval_every", str(self.eval_every))
        return sets

    def pruner(self):
        return make_pruner(self.spec, self.eval_every or 1)

    def __call__(self, trial: optuna.Trial) -> list[float]:
        self._log(f"trial {trial.number} started by pid {os.getpid()} on {socket.gethostname()}")
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            result = self._run(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            raise  # FAIL with no reason: rerunning the search queues it again
        except UsageError as e:  # the sampled configuration is not a valid model
            return self._fail(trial, f"invalid configuration: {e}")
        except TrialFailed as e:
            return self._fail(trial, str(e))
        except Exception as e:  # OOM, a block that raises on these knobs, ...: data, not a crash
            if "out of memory" in str(e).lower():
                _free_cuda()
            return self._fail(trial, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
        self._record(trial, result)
        return self._score(trial, result)

    def _run(self, trial: optuna.Trial) -> list[dict]:
        """Sample a configuration (sampled knobs over ``--set`` ones), size it to the budget, run its
        depth sweep on each task the objectives need, and return the eval results."""
        from archbench.sweep import run_eval

        block, sampled = sample(trial, self.space)
        planned = self.plan(block, sampled)
        for i, (sw, _, _, budget) in enumerate(planned):
            if budget:
                trial.set_user_attr("budget" if i == 0 else f"budget:{sw.task}", budget)
        evals = [{"block": block, "task": sw.task, "preset": self.spec.preset, "sets": sets} for sw, sets, _, _ in planned]
        trial.set_user_attr("eval", {"block": block, "sets": planned[0][1]})
        trial.set_user_attr("evals", evals)
        return [run_eval(self._eval_spec(sw, block, sets), console=self.console,
                         on_run=lambda runs, task, sw=sw, seeds=config.seeds: self._report(trial, runs, task, seeds, sw),
                         on_eval=self._stepper(trial, sw, config))
                for sw, sets, config, _ in planned]

    def plan(self, block: str, sampled: dict[str, dict]) -> list[tuple[Sweep, dict, object, dict | None]]:
        """Each sweep of ``block`` with the ``sampled`` settings: its ``--set`` values, resolved config and,
        under a budget, the width fitted to it (``sets["model"]["width"]``) with what it used."""
        from archbench.config import resolve_config

        planned = []
        for sw in self.sweeps:
            sets = self._sets(sw, sampled)
            config = resolve_config(self._eval_spec(sw, block, sets))
            if config.grid:
                raise UsageError("a search trial is one depth sweep per task: --set values with commas (grids) "
                                 "are not supported in search")
            budget = None
            if sw.limit is not None:
                width, used = fit_width(block, config, sw.max_depth, sw.task_obj, self.spec.budget, sw.limit,
                                        ceiling=8 * sw.ref_width)
                sets.setdefault("model", {})["width"] = width
                budget = {"kind": self.spec.budget, "limit": sw.limit, "used": used, "depth": sw.max_depth}
            planned.append((sw, sets, config, budget))
        return planned

    def _stepper(self, trial, sw: Sweep, config):
        """With a step pruner: at each in-training evaluation, the objective on the held-out metrics of the
        runs training then, reported at that step once every depth the objective reads is among them."""
        if not (self.by_steps and self.spec.objectives[0] in sw.objectives):
            return None
        name, deepest = self.spec.objectives[0], max(config.depths)

        def on_eval(step, points):
            value = stepwise_value(name, points, deepest, sw.task_obj.headline_metric())
            if value is not None and math.isfinite(value):
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{name} {value:.4g} at step {step}")

        return on_eval

    def _record(self, trial, results: list[dict]) -> None:
        """Where the trial's results and run records are, and a line per run."""
        trial.set_user_attr("result", results[0]["files"]["result"])
        trial.set_user_attr("results", [r["files"]["result"] for r in results])
        trial.set_user_attr("records", [r["key"] for res in results for r in res["runs"]])
        trial.set_user_attr("runs", [{**{k: r[k] for k in ("key", "depth", "seed", "params", "final_loss", "status",
                                                           "wall_s")}, "task": sw.task}
                                     for sw, res in zip(self.sweeps, results) for r in res["runs"]])

    def _score(self, trial, results: list[dict]) -> list[float]:
        """The objective values; a failed run or an objective that cannot be computed fails the trial."""
        failed = [(sw, r) for sw, res in zip(self.sweeps, results) for r in res["runs"] if r["status"] != "ok"]
        if failed:
            sw, r = failed[0]
            return self._fail(trial, f"{sw.task} depth {r['depth']} seed {r['seed']}: {r['failure']}")
        of = {o: (sw, res) for sw, res in zip(self.sweeps, results) for o in sw.objectives}
        values = []
        for o in self.spec.objectives:
            sw, res = of[o]
            values.append(objective_value(o, res, sw.task_obj.headline_metric()))
            if o == "alpha":
                trial.set_user_attr("alpha_ci95", res["metrics"].get("alpha-ell", {}).get("ci95"))
        for o, v in zip(self.spec.objectives, values):
            if v is None or not math.isfinite(v):
                note = of[o][1]["metrics"].get("alpha-ell", {}).get("note", "") if o == "alpha" else ""
                return self._fail(trial, f"objective {o} could not be computed" + (f" ({note})" if note else ""))
        return values

    def _report(self, trial, runs, task, seeds, sw: Sweep):
        """After each run: the objective on the depths finished so far, for the median pruner."""
        if (self.spec.pruner != "median" or len(self.spec.objectives) != 1 or len(runs) % seeds
                or self.spec.objectives[0] not in sw.objectives):
            return
        value = intermediate_value(self.spec.objectives[0], runs, task)
        if value is not None and math.isfinite(value):
            step = len({r.depth for r in runs})
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"{self.spec.objectives[0]} {value:.4g} after {step} depth(s)")

    def _fail(self, trial, reason: str):
        trial.set_user_attr(FAILURE, reason)
        raise TrialFailed(reason)

    def _log(self, line: str) -> None:
        """An append-only audit trail of which worker ran which trial."""
        self.spec.study_dir.mkdir(parents=True, exist_ok=True)
        with open(self.spec.study_dir / "trials.log", "a") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def _free_cuda():
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
