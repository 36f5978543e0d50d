"""n-operand modular arithmetic: ``a1 + a2 + … + an =`` (or ``*``) and the result mod p.

The label, at the ``=``, is the sum (or product) of the n operands mod p. Each extra operand
is one more sequential step if the model computes left to right. n = 2 is the control. Products
draw operands from 1..p-1 so that, for prime p, no zero makes the answer trivial.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

import archbench
from archbench.errors import UsageError
from archbench.knobs import POSITIVE, Range
from archbench.model import InputSpec
from archbench.task import IGNORE, SequenceTask

TRAIN = {"lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.05, "grad_clip": 1.0, "weight_decay": 0.1,
         "optimizer": "adamw"}


@archbench.register_task("modular-chain", family="compositional",
                         citation="modular arithmetic as in Power et al. 2022 (grokking) and Nanda et al. 2023")
class ModularChain(SequenceTask):
    """The sum or product of n operands mod p, answered at the ``=``; n = 2 is the control."""

    presets = {
        "smoke": {"depths": [1, 2], "seeds": 1, "task": {"n": 2, "p": 23, "eval_size": 128},
                  "model": {"width": 32}, "train": {**TRAIN, "steps": 60, "batch_size": 64, "lr": 3e-3}},
        "quick": {"depths": [1, 2, 4, 8], "seeds": 1, "task": {"p": 31, "eval_size": 200}, "model": {"width": 64},
                  "train": {**TRAIN, "steps": 3000, "batch_size": 128}},
        "paper": {"depths": [1, 2, 4, 8, 12, 16], "seeds": 1, "task": {"p": 97}, "model": {"width": 256},
                  "train": {**TRAIN, "steps": 20_000, "batch_size": 256}},
    }

    def __init__(self, *, device="cpu",
                 n: Annotated[int, Range(2, 16), POSITIVE] = 3,
                 p: Annotated[int, POSITIVE] = 97,
                 op: Literal["sum", "product"] = "sum",
                 data_seed: int = 0,
                 eval_size: Annotated[int, POSITIVE] = 256):
        super().__init__(device=device)
        if n < 2 or p < 2:
            raise UsageError(f"task.n={n}, task.p={p}: need n >= 2 operands and a modulus p >= 2")
        self.n, self.p, self.op = n, p, op
        self.OP, self.EQ = p, p + 1
        self.input = InputSpec("tokens", size=p + 2, out_dim=p, seq_len=2 * n)
        self.setup(data_seed, eval_size)

    def problem_count(self):
        count = (self.p - (self.op == "product")) ** self.n
        return count if count < 10 ** 9 else None

    def sample(self, n, generator):
        low = 1 if self.op == "product" else 0
        a = torch.randint(low, self.p, (n, self.n), generator=generator, device=self.device)
        result = a[:, 0]
        for i in range(1, self.n):
            result = (result + a[:, i]) % self.p if self.op == "sum" else (result * a[:, i]) % self.p
        ops = torch.full_like(a, self.OP)
        ops[:, -1] = self.EQ
        x = torch.stack([a, ops], -1).flatten(1)  # a1 op a2 op ... an =
        y = torch.full_like(x, IGNORE)
        y[:, -1] = result
        return x, y
