"""What a task is: it makes batches on its device, defines the loss, and evaluates a model.

A task class is registered with ``@archbench.register_task("name")``; its knobs are keyword
arguments of ``__init__`` (after ``device``). ``presets`` names budgets; each
preset maps config sections (``task``, ``model``, ``train``, ``block``) to values, plus
``depths`` and ``seeds``, and every value can be overridden with ``--set``.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch

from archbench.model import InputSpec


class Task:
    input: InputSpec
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    # Additive loss floor for the alpha_ell fit: 0 where the loss is a divergence to a known
    # target (KL), None where it is unknown and must be fitted (language modelling).
    loss_floor: ClassVar[float | None] = 0.0

    def __init__(self, *, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh training batch (inputs, targets) drawn on ``self.device``."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The fixed held-out set: the same for every run of this task configuration."""
        raise NotImplementedError

    def metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Extra per-batch held-out metrics besides the loss (averaged over the eval batches)."""
        return {}

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int, autocast=None) -> dict[str, float]:
        """Mean held-out loss (and the task's metrics) over the fixed eval batches."""
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        batches = self.eval_batches(batch_size)
        for x, y in batches:
            with autocast or contextlib.nullcontext():
                logits = model(x)
            logits = logits.float()
            vals = {"loss": self.loss(logits, y).item(), **self.metrics(logits, y)}
            for k, v in vals.items():
                totals[k] = totals.get(k, 0.0) + v / len(batches)
        model.train(was_training)
        return totals

