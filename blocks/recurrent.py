"""Recurrent depth: the same blocks applied again and again, so effective depth ≠ parameter count.

Every application of a core block is one effective layer: effective depth = prelude + r·core + coda.
``--depths`` sets the effective depth (r follows from it, at fixed parameters); ``--recurrence``
sets r directly. ``model.body.recurrence = r`` changes r of a trained model at evaluation, also
beyond what training saw (test-time depth), without retraining.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch
from torch import nn

import archbench
from archbench.errors import UsageError
from archbench.knobs import Range
from archbench.model import Stack, run_layers, step
from archbench.nn import PreNormBlock


class Recurrent(Stack):
    """A stack whose effective depth is ``fixed + r·unit`` for r ≥ 1 iterations of a shared core."""

    @classmethod
    def shape(cls, knobs: dict) -> tuple[int, int]:
        """(fixed layers, layers per iteration) for these knobs (all of them, defaults filled in)."""
        raise NotImplementedError

    @classmethod
    def depth_for(cls, recurrence: int, knobs: dict) -> int:
        fixed, unit = cls.shape(knobs)
        return fixed + recurrence * unit

    @classmethod
    def recurrence_for(cls, depth: int, knobs: dict) -> int:
        fixed, unit = cls.shape(knobs)
        return (depth - fixed) // unit

    @classmethod
    def check_depth(cls, depth: int, knobs: dict) -> None:
        fixed, unit = cls.shape(knobs)
        if depth < fixed + unit or (depth - fixed) % unit:
            valid = ", ".join(str(fixed + r * unit) for r in range(1, 5))
            name = getattr(cls, "registry_name", cls.__name__)
            raise UsageError(f"{name} cannot have effective depth {depth}: it is {fixed} + r·{unit} for r ≥ 1 "
                             f"with these knobs, e.g. {valid}, …")


def sinusoid(i: int, dim: int, device) -> torch.Tensor:
    """The Transformer's sinusoidal code of the integer ``i`` (Universal Transformer's step signal)."""
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(0, dim, 2, device=device) / dim)
    emb = torch.zeros(dim, device=device)
    emb[0::2] = torch.sin(i * freqs)
    emb[1::2] = torch.cos(i * freqs[: dim // 2])
    return emb


@archbench.register_block("looped", family="recurrent",
                          citation="Dehghani et al. 2019, Universal Transformers")
class Looped(Recurrent):
    """One block of k pre-norm layers applied n times, optionally told the step (Universal Transformer).

    With ``step_embedding`` the step's sinusoidal code is added to the stream entering each iteration,
    as the Universal Transformer's timestep signal."""

    knobs_from = (PreNormBlock,)

    @classmethod
    def shape(cls, knobs):
        return 0, knobs["loop_layers"]

    def __init__(self, dim: int, depth: int, *, loop_layers: Annotated[int, Range(1, 4)] = 1,
                 step_embedding: bool = False, **branch):
        super().__init__([PreNormBlock(dim, **branch) for _ in range(loop_layers)])
        self.recurrence = self.recurrence_for(depth, {"loop_layers": loop_layers})
        self.step_embedding = step_embedding

    def effective_layers(self):
        return list(self.layers) * self.recurrence

    def forward(self, h, intervene=None):
        l = 0
        for i in range(self.recurrence):
            for j, block in enumerate(self.layers):
                x = h + sinusoid(i, h.shape[-1], h.device).to(h.dtype) if j == 0 and self.step_embedding else h
                h = step(intervene, l, h, block(x))
                l += 1
        return h


@archbench.register_block("recurrent-depth", family="recurrent",
                          citation="Geiping et al. 2025, Scaling up Test-Time Compute with Latent Reasoning: "
                                   "A Recurrent Depth Approach")
class RecurrentDepth(Recurrent):
    """Prelude, a core of k blocks iterated r times with the prelude's output re-injected, coda.

    Prelude blocks embed, a core of k blocks iterates r times on a latent state s with the prelude's
    output e re-injected at every iteration (s + e, Linear[s; e] initialised as s + e, or a learned gate),
    coda blocks decode. Training may draw r per step from the paper's log-normal Poisson
    (τ ~ N(log(r̄−1) − σ²/2, σ), r = Poisson(e^τ) + 1, mean r̄ = the depth's r) and backpropagate through
    the last ``k_bptt`` iterations only. The latent state starts at e (the paper starts from noise;
    starting at e keeps evaluation deterministic and gives "skip" its usual meaning)."""

    knobs_from = (PreNormBlock,)

    @classmethod
    def shape(cls, knobs):
        return knobs["prelude"] + knobs["coda"], knobs["core"]

    def __init__(self, dim: int, depth: int, *,
                 prelude: Annotated[int, Range(0, 4)] = 1,
                 core: Annotated[int, Range(1, 4)] = 1,
                 coda: Annotated[int, Range(0, 4)] = 1,
                 injection: Literal["add", "concat", "gate"] = "concat",
                 sampling: Literal["fixed", "lognormal-poisson"] = "fixed",
                 sigma: Annotated[float, Range(0.1, 1.0)] = 0.5,
                 k_bptt: Annotated[int | None, Range(1, 16)] = None,
                 **branch):
        super().__init__()
        self.prelude = nn.ModuleList(PreNormBlock(dim, **branch) for _ in range(prelude))
        self.core = nn.ModuleList(PreNormBlock(dim, **branch) for _ in range(core))
        self.coda = nn.ModuleList(PreNormBlock(dim, **branch) for _ in range(coda))
        self.recurrence = self.recurrence_for(depth, {"prelude": prelude, "core": core, "coda": coda})
        self.injection, self.sampling, self.sigma, self.k_bptt = injection, sampling, sigma, k_bptt
        if injection == "concat":
            self.adapter = nn.Linear(2 * dim, dim, bias=False)
            with torch.no_grad():
                self.adapter.weight.copy_(torch.cat([torch.eye(dim), torch.eye(dim)], dim=1))
        elif injection == "gate":
            self.adapter = nn.Linear(2 * dim, dim)
            nn.init.zeros_(self.adapter.weight)
            nn.init.zeros_(self.adapter.bias)
        # the draw counter and seed live in the state dict, so a resumed run draws the same r's
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        self.register_buffer("draw_seed", torch.randint(2**31, ()))

    def effective_layers(self):
        return [*self.prelude, *list(self.core) * self.recurrence, *self.coda]

    def inject(self, s, e):
        if self.injection == "add":
            return s + e
        z = self.adapter(torch.cat([s, e], dim=-1)).to(s.dtype)  # the state stays fp32 under autocast
        if self.injection == "concat":
            return z
        g = torch.sigmoid(z)
        return g * s + (1 - g) * e

    def draw_recurrence(self) -> int:
        mean = self.recurrence - 1  # r = Poisson(e^τ) + 1 has mean e^{E τ + σ²/2} + 1
        if self.sampling == "fixed" or mean <= 0:
            return self.recurrence
        rng = np.random.default_rng([int(self.draw_seed), int(self.draws)])
        self.draws += 1
        tau = rng.normal(math.log(mean) - self.sigma**2 / 2, self.sigma)
        return int(rng.poisson(math.exp(tau))) + 1

    def forward(self, h, intervene=None):
        h = run_layers(self.prelude, h, intervene)
        l = len(self.prelude)
        e = s = h
        r = self.draw_recurrence() if self.training else self.recurrence
        no_grad = max(0, r - self.k_bptt) if self.training and self.k_bptt else 0
        for i in range(r):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= no_grad):
                for j, block in enumerate(self.core):
                    s = step(intervene, l, s, block(self.inject(s, e) if j == 0 else s))
                    l += 1
        return run_layers(self.coda, s, intervene, l)
