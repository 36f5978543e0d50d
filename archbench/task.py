"""What a task is: it makes batches on its device, defines the loss, evaluates a model and says
when the model counts as having solved it.

A task class is registered with ``@archbench.register_task("name")``; its knobs are keyword
arguments of ``__init__`` (after ``device``). ``presets`` names budgets; each
preset maps config sections (``task``, ``model``, ``train``, ``block``) to values, plus
``depths`` and ``seeds``, and every value can be overridden with ``--set``.

``SequenceTask`` is the base of the synthetic token tasks: a subclass only writes ``sample``
(problems and their labels); the base keeps a fixed held-out set, keeps held-out problems out of
training batches, and scores per-position accuracy.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from archbench.errors import UsageError
from archbench.model import InputSpec

IGNORE = -100  # label of a position that is not scored (F.cross_entropy's ignore_index)
EVAL_STREAM = 1_000_003  # offset of the held-out set's seed from the task's data seed


def pure_loss(fn):
    """Marks a task's ``loss`` as reading only (logits, targets), none of the task's settings, so that
    batched training can compute it for runs of different settings in one vmapped call."""
    fn.pure = True
    return fn


class Task:
    input: InputSpec
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Additive loss floor for the alpha_ell fit: 0 where the loss is a divergence to a known
    # target (KL), None where it is unknown and must be fitted (language modelling).
    loss_floor: ClassVar[float | None] = 0.0
    # Evaluators that `archbench eval` runs when none are named.
    default_evaluators: ClassVar[tuple[str, ...]] = ("alpha-ell",)
    # "Solved" means held-out ``solve_metric`` >= ``solve_at``; None: the task has no such notion.
    solve_metric: ClassVar[str | None] = None
    solve_at: ClassVar[float] = 0.99
    # The knob that picks a task's teacher, where it has one: ``--teachers N`` replicates a sweep over
    # its values 0..N-1, like ``--seeds`` over student seeds.
    teacher_knob: ClassVar[str | None] = None
    # The block every other is compared with in a leaderboard table (its row at default knobs).
    baseline_block: ClassVar[str] = "residual"

    def __init__(self, *, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh training batch (inputs, targets) drawn on ``self.device``."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Batched training (archbench.batched) shares batches between runs: runs whose tasks have equal
    # ``stream_key`` and equal seeds draw one ``draw`` per step, and each turns it into its own
    # targets. The defaults share nothing; ``batch`` must equal ``targets(*draw(...))``.
    def stream_key(self):
        return id(self)

    def draw(self, batch_size: int, generator: torch.Generator):
        """(inputs, what runs with this stream key can share) for one step; default: the batch."""
        return self.batch(batch_size, generator)

    def targets(self, x: torch.Tensor, shared) -> torch.Tensor:
        return shared

    def draw_many(self, batch_size: int, generator: torch.Generator, n: int) -> list[tuple]:
        """``n`` steps' ``draw``s in one call, equal to ``n`` calls of ``draw`` in a row up to floating-point
        summation order. A task overrides it where the shared work batches well (a teacher's forward on
        all ``n`` steps' inputs at once); the batched engine asks for steps ahead only from a task that
        does, so a task whose draws depend on ``set_progress`` keeps this default."""
        return [self.draw(batch_size, generator) for _ in range(n)]

    def compile_draw(self) -> None:
        """Compile (``torch.compile``) the work ``draw`` does every step; the batched engine calls it when
        it compiles training. Default: nothing to compile."""

    def readout(self, width: int) -> torch.nn.Module | None:
        """A readout every model of this task must use (a fresh module per call), or None for a learned one."""
        return None

    def eval_batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out set: the same for every run of this task configuration."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | list[float]]:
        """Extra per-batch held-out metrics besides the loss (averaged over the eval batches)."""
        return {}

    def set_progress(self, fraction: float) -> None:
        """Called before every training step with the fraction of training done (for curricula)."""

    def headline_metric(self) -> str | None:
        """The held-out metric a leaderboard shows for this task beside the loss (its name says which way is
        better), compared with the baseline row's at the deepest depth; None: the loss says it all."""
        return None

    def solved(self, metrics: dict) -> bool | None:
        """Whether held-out ``metrics`` count as solving the task (None: no such notion)."""
        if self.solve_metric is None or self.solve_metric not in metrics:
            return None
        return bool(metrics[self.solve_metric] >= self.solve_at)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int, autocast=None) -> dict[str, Any]:
        """Mean held-out loss and the task's metrics over the fixed eval batches (lists elementwise)."""
        was_training = model.training
        model.eval()
        totals: dict[str, Any] = {}
        batches = self.eval_batches(batch_size)
        for x, y in batches:
            with autocast or contextlib.nullcontext():
                logits = model(x)
            logits = logits.float()
            vals = {"loss": self.loss(logits, y).item(), **self.metrics(logits, y)}
            for k, v in vals.items():
                totals[k] = totals.get(k, 0.0) + np.asarray(v, dtype=float) / len(batches)
        model.train(was_training)
        return {k: v.tolist() for k, v in totals.items()}


@functools.lru_cache(maxsize=None)
def _hash_weights(length: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0x5EED)
    return torch.randint(1, 2 ** 31 - 1, (length,), generator=g, dtype=torch.long).to(device)


def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """A 64-bit hash per row of a (B, T) token tensor (random weights < 2^31, so no overflow for T·vocab < 2^32)."""
    return ((x.long() + 1) * _hash_weights(x.shape[1], x.device)).sum(-1)


class SequenceTask(Task):
    """Token sequences in, a class at some positions out (``IGNORE`` elsewhere).

    A subclass sets ``self.input`` and calls ``self.setup(seed, eval_size)`` at the end of its
    ``__init__``; it writes ``sample(n, generator) -> (x, y)`` with x (n, T) token ids and y (n, T)
    labels. The held-out set is ``eval_size`` problems drawn from seed ``seed + EVAL_STREAM``;
    a training problem equal to a held-out one is redrawn, so held-out accuracy measures
    generalisation even where the space of problems is small. A language-modelling task sets
    ``exclude_heldout = False``: its held-out windows are plain draws from the same distribution
    (excluding them would make them rarer in training than in the language).
    """

    loss_floor = 0.0  # labels are deterministic: a perfect model has zero loss
    default_evaluators = ("depth-to-solve",)
    solve_metric = "accuracy"
    per_position: ClassVar[bool] = False  # report accuracy at every position (running-state tasks)
    exclude_heldout: ClassVar[bool] = True

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def heldout_sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out problems (default: ``sample``'s; a task whose held-out set is stratified overrides it)."""
        return self.sample(n, generator)

    def problem_count(self) -> int | None:
        """The number of distinct problems, where it is small enough to matter (None: vast)."""
        return None

    def setup(self, seed: int, eval_size: int) -> None:
        count = self.problem_count()
        if count is not None and eval_size > count // 4:
            raise UsageError(f"task.eval_size={eval_size}: this configuration has only {count} distinct "
                             f"problems, so a held-out set that large leaves too few to train on; "
                             f"use eval_size <= {count // 4} or a larger problem space")
        g = torch.Generator(device=self.device).manual_seed(seed + EVAL_STREAM)
        self.heldout = self.heldout_sample(eval_size, g)
        self._heldout_fp = torch.unique(fingerprint(self.heldout[0]))

    def batch(self, batch_size, generator):
        x, y = self.sample(batch_size, generator)
        if not self.exclude_heldout:
            return x, y
        for _ in range(1000):
            clash = torch.isin(fingerprint(x), self._heldout_fp)
            if not clash.any():
                return x, y
            x2, y2 = self.sample(int(clash.sum()), generator)
            x, y = x.clone(), y.clone()
            x[clash], y[clash] = x2, y2
        raise UsageError(f"task {type(self).__name__}: could not draw training problems outside the held-out set; "
                         f"the problem space is too small for task.eval_size")

    def eval_batches(self, batch_size):
        x, y = self.heldout
        return list(zip(x.split(batch_size), y.split(batch_size)))

    @pure_loss
    def loss(self, logits, targets):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)

    def metrics(self, logits, targets):
        labelled = targets != IGNORE
        right = (logits.argmax(-1) == targets) & labelled
        out = {"accuracy": (right.sum() / labelled.sum()).item(),
               "sequence_accuracy": (right == labelled).all(-1).float().mean().item()}
        if self.per_position:
            out["accuracy_by_position"] = (right.sum(0) / labelled.sum(0).clamp(min=1)).tolist()
        return out

    def evaluate(self, model, batch_size, autocast=None):
        out = super().evaluate(model, batch_size, autocast)
        if self.per_position:  # the worst of the held-out per-position accuracies (positions with labels)
            scored = (self.heldout[1] != IGNORE).any(0).tolist()
            out["worst_position_accuracy"] = min(a for a, s in zip(out["accuracy_by_position"], scored) if s)
        return out

