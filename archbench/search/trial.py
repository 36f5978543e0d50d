"""One trial, the objective function Optuna calls: sample a configuration, fit it to the budget, run
its eval sweep, score it. A trial that cannot be scored is marked FAIL with its reason."""

from __future__ import annotations

import math
import os
import socket
import time

import optuna

from archbench.errors import UsageError
from archbench.registry import TASKS
from archbench.search.budget import fit_width, measure
from archbench.search.failures import FAILURE, TrialFailed
from archbench.search.objectives import OBJECTIVES, intermediate_value, objective_value
from archbench.search.space import Space, sample
from archbench.search.study import SearchSpec


class TrialRunner:
    """The objective function: one trial = sample, fit the budget, run the eval sweep, score it."""

    def __init__(self, spec: SearchSpec, space: Space, console=None):
        from archbench.config import EvalSpec, resolve_config
        from archbench.sweep import make_task

        self.spec, self.space, self.console = spec, space, console
        evaluators = sorted({e for o in spec.objectives for e in OBJECTIVES[o].evaluators})
        self.evaluators = evaluators
        # a pruned study needs the depths one after another (the batched engine trains them together)
        engine = "plain" if spec.pruner != "none" and len(spec.objectives) == 1 else "auto"
        self._eval_spec = lambda block, sets: EvalSpec(
            block=block, task=spec.task, preset=spec.preset, depths=spec.depths, seeds=spec.seeds,
            sets=sets, evaluators=evaluators, device=spec.device, runs_dir=spec.runs_dir, plots=False,
            engine=engine)
        # the baseline's resolved config checks task, preset, --set and the objectives' evaluators up front
        ref = resolve_config(self._eval_spec(spec.baseline or "residual", spec.sets))
        self.limit = None
        if spec.budget != "none":
            import torch

            self.ref_width, self.max_depth = ref.model["width"], max(ref.depths)
            self.task = make_task(TASKS.get(spec.task), ref.task, torch.device("cpu"))
            self.limit = measure(spec.baseline or "residual", ref, self.max_depth, self.task, self.ref_width,
                                 spec.budget)

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

    def _run(self, trial: optuna.Trial) -> dict:
        """Sample a configuration (sampled knobs over ``--set`` ones), size it to the budget, run its
        depth sweep and return the eval result."""
        from archbench.config import resolve_config
        from archbench.sweep import run_eval

        spec = self.spec
        block, sampled = sample(trial, self.space)
        sets = {section: dict(values) for section, values in spec.sets.items()}
        for section, values in sampled.items():
            sets.setdefault(section, {}).update(values)
        config = resolve_config(self._eval_spec(block, sets))
        if config.grid:
            raise UsageError("a search trial is one depth sweep: --set values with commas (grids) are not "
                             "supported in search")
        if self.limit is not None:
            width, used = fit_width(block, config, self.max_depth, self.task, spec.budget, self.limit,
                                    ceiling=8 * self.ref_width)
            sets.setdefault("model", {})["width"] = width
            trial.set_user_attr("budget", {"kind": spec.budget, "limit": self.limit, "used": used,
                                           "depth": self.max_depth})
        trial.set_user_attr("eval", {"block": block, "sets": sets})
        return run_eval(self._eval_spec(block, sets), console=self.console,
                        on_run=lambda runs, task: self._report(trial, runs, task, config.seeds))

    def _record(self, trial, result: dict) -> None:
        """Where the trial's result and run records are, and a line per run."""
        trial.set_user_attr("result", result["files"]["result"])
        trial.set_user_attr("records", [r["key"] for r in result["runs"]])
        trial.set_user_attr("runs", [{k: r[k] for k in ("key", "depth", "seed", "params", "final_loss", "status",
                                                         "wall_s")} for r in result["runs"]])

    def _score(self, trial, result: dict) -> list[float]:
        """The objective values; a failed run or an objective that cannot be computed fails the trial."""
        failed = [r for r in result["runs"] if r["status"] != "ok"]
        if failed:
            r = failed[0]
            return self._fail(trial, f"depth {r['depth']} seed {r['seed']}: {r['failure']}")
        values = [objective_value(o, result) for o in self.spec.objectives]
        trial.set_user_attr("alpha_ci95", result["metrics"].get("alpha-ell", {}).get("ci95"))
        for o, v in zip(self.spec.objectives, values):
            if v is None or not math.isfinite(v):
                note = result["metrics"].get("alpha-ell", {}).get("note", "") if o == "alpha" else ""
                return self._fail(trial, f"objective {o} could not be computed" + (f" ({note})" if note else ""))
        return values

    def _report(self, trial, runs, task, seeds):
        """After each run: the objective on the depths finished so far, for the pruner."""
        if len(self.spec.objectives) != 1 or len(runs) % seeds:
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
