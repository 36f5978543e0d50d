"""Architecture search: Optuna samples a block family, that family's knobs and a model size under a
budget; each trial is an ``archbench eval`` depth sweep, scored by the objectives below.

- **Space.** A trial first draws ``block`` from the families in the space, then that block's knobs
  (Optuna parameters named ``BLOCK.KNOB``, so each family's knobs exist only when it is drawn), then
  any ``train.*``/``model.*`` parameters the space adds. By default a block's searched knobs are the
  ones it declares a ``Range`` (or ``Literal`` choices) for, minus those the preset or ``--set`` pins.
  A TOML file (``--space``) narrows the families, adds ranges and pins values.
- **Budget.** ``params`` (default): the model width is the largest multiple of the width step whose
  parameter count at the sweep's largest depth is at most the baseline's (the ``residual`` block at
  the preset's width). ``flops``: the same with forward FLOPs per example, counted by
  ``archbench.nn.flop_counter`` (recurrent blocks pay for every application of a shared layer).
  ``none``: the preset's width for every trial.
- **Objectives.** ``alpha`` (α_ℓ, maximise), ``loss`` (held-out loss at the largest depth, minimise),
  ``depth-to-solve`` (hardest difficulty; unsolved counts as twice the largest depth tried, minimise),
  ``redundancy`` (1 − mean effect of skipping a layer on the later layers, capped at 0; minimise), and
  two measured on a task of their own whatever ``--task`` is: ``compose`` (held-out hop-induction error
  averaged over k = 1…K, minimise) and ``lm-loss`` (held-out loss on lm-char, minimise); the defaults. A trial runs one
  depth sweep per task its objectives need, each at the study's preset and sized to the baseline's
  budget on that task. Several objectives make a multi-objective study whose answer is the Pareto front.
- **Pruning.** In a single-objective study, ``median`` has each trial report the objective on the
  depths finished so far (the depths train in increasing order, one run at a time) and stops trials
  that are hopeless at that depth; ``hyperband`` and ``sha`` take training steps as the resource: the
  depths train together, evaluate every ``train.eval_every`` steps, and each evaluation reports the
  objective at that step. Multi-objective studies are not pruned (Optuna has no pruner for them), so
  their trials train all depths together with the batched engine.
- **Failures are data.** A trial that diverges, runs out of memory, exceeds the budget or raises is
  marked FAIL with the reason in its ``failure`` attribute, and the study goes on.
- **Storage and resume.** A SQLite file under the runs directory by default; the study keeps the
  search's configuration and refuses a different one under the same name. Rerunning the command
  continues the study up to ``--trials`` trials in all, re-queues trials cut off by an interruption
  (or, with a shared database, by a worker that died: Optuna's heartbeat), and reuses every finished
  run record. ``--workers K`` runs K processes on one machine, or K tasks on a Ray cluster
  (``--ray``, ``archbench.cluster``); many machines share a study through a PostgreSQL URL.
- **Confirmation and the table.** ``--confirm N`` re-runs the front and the baseline with N seeds at
  the preset's budget and compares each objective with the baseline's (paired bootstrap), and each
  trial with its control (the baseline block with the trial's shared knobs, at the same budget); the
  study's table (``table``) shows all of it, with the trial count.

Where each part lives: ``objectives`` (what a trial is scored on), ``space`` (what a trial may draw),
``budget`` (the width that keeps a trial at the baseline's size), ``failures`` (a failed trial is
data), ``study`` (the search's settings, storage, resume), ``trial`` (the objective function Optuna
calls), ``workers`` (``run_search`` and its worker processes), ``results`` (trial rows, the best
trials, the command that reproduces one), ``confirm`` (the front re-run with seeds), ``table`` (the
published table), ``figures`` (Optuna's plots as PNG).
"""

from archbench.search.budget import fit_width, measure, width_step
from archbench.search.failures import FAILURE, TrialFailed
from archbench.search.objectives import OBJECTIVES, Objective, intermediate_value, objective_value, parse_objectives
from archbench.search.results import eval_command, summary, trial_row
from archbench.search.space import Space, build_space, knob_distribution, sample
from archbench.search.study import (SearchSpec, counted, enqueue_baseline, open_storage, open_study, requeue, resume,
                                    search_config)
from archbench.search.trial import TrialRunner
from archbench.search.workers import run_search, study_space

__all__ = [
    # objectives
    "OBJECTIVES", "Objective", "intermediate_value", "objective_value", "parse_objectives",
    # space
    "Space", "build_space", "knob_distribution", "sample",
    # budget
    "fit_width", "measure", "width_step",
    # failures
    "FAILURE", "TrialFailed",
    # study
    "SearchSpec", "counted", "enqueue_baseline", "open_storage", "open_study", "requeue", "resume", "search_config",
    # trial, workers, results
    "TrialRunner", "run_search", "study_space", "eval_command", "summary", "trial_row",
]
