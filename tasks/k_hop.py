"""In-context pointer chasing: follow a query through k (key -> value) pairs of the context.

A context holds P pairs with distinct keys in random order, then a token naming the hop count
and the query. The label, at the last position, is f^k(q) where f maps each key to its value.
The chain q -> ... -> f^k(q) visits k + 1 distinct symbols, so no shortcut through a cycle
exists; the other pairs are distractors with random values. k = 1 is the control: a single lookup.

``encoding=pair`` (default) writes each pair as one token (key·alphabet + value), so a hop is
one attention lookup and the natural algorithm needs about one layer per hop (fewer with pointer
doubling). ``encoding=tokens`` writes ``k1 v1 k2 v2 ...``, which first needs an induction circuit
(a previous-token head) and learns far more slowly.

Plain training on large k is known to stall; ``curriculum=grow`` draws each training example's
hop count uniformly from 1..k_now, where k_now rises from 1 to k over the first
``curriculum_frac`` of training (then stays at k). The held-out set is always at exactly k.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch

import archbench
from archbench.errors import UsageError
from archbench.knobs import FRACTION, POSITIVE, Range
from archbench.model import InputSpec
from archbench.task import IGNORE, SequenceTask

TRAIN = {"lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.05, "grad_clip": 1.0}


@archbench.register_task("k-hop", family="compositional",
                         citation="pointer chasing / induction heads, e.g. Sanford et al. 2024 (arXiv 2402.09268)")
class KHop(SequenceTask):
    """Follow a query through k in-context (key -> value) pairs; k = 1 is the single-lookup control."""

    presets = {
        "smoke": {"depths": [1, 2], "seeds": 1, "task": {"k": 1, "pairs": 4, "alphabet": 8, "eval_size": 256},
                  "model": {"width": 32}, "train": {**TRAIN, "steps": 60, "batch_size": 64, "lr": 3e-3}},
        # About 10 minutes per k on a 2-core CPU; k = 1 needs about 1500 steps to form the lookup.
        "quick": {"depths": [1, 2, 3, 4], "seeds": 1, "task": {"pairs": 8, "alphabet": 16},
                  "model": {"width": 64}, "train": {**TRAIN, "steps": 3000, "batch_size": 128}},
        "paper": {"depths": [1, 2, 3, 4, 6, 8, 12, 16], "seeds": 1, "task": {"pairs": 32, "alphabet": 64},
                  "model": {"width": 256}, "train": {**TRAIN, "steps": 20_000, "batch_size": 256}},
    }

    def __init__(self, *, device="cpu",
                 k: Annotated[int, Range(1, 16), POSITIVE] = 2,
                 pairs: Annotated[int, POSITIVE] = 16,
                 alphabet: Annotated[int, POSITIVE] = 32,
                 encoding: Literal["pair", "tokens"] = "pair",
                 curriculum: Literal["none", "grow"] = "none",
                 curriculum_frac: Annotated[float, FRACTION] = 0.5,
                 data_seed: int = 0,
                 eval_size: Annotated[int, POSITIVE] = 1024):
        super().__init__(device=device)
        if not 1 <= k <= pairs:
            raise UsageError(f"task.k={k}: needs 1 <= k <= pairs ({pairs}), since the chain's keys are distinct pairs")
        if pairs >= alphabet:
            raise UsageError(f"task.pairs={pairs}: needs fewer pairs than alphabet symbols ({alphabet}) so that "
                             f"the answer can lie outside the chain")
        self.k, self.pairs, self.alphabet, self.encoding = k, pairs, alphabet, encoding
        self.curriculum, self.curriculum_frac = curriculum, curriculum_frac
        self.k_now: int | None = None  # None: every example at exactly k (no curriculum; the held-out set)
        # tokens: symbols 0..A-1, one "hop count" token per k in 1..pairs, then (pair encoding) pair tokens
        self.HOP = alphabet
        n_pair_tokens = alphabet * alphabet if encoding == "pair" else 0
        length = (pairs if encoding == "pair" else 2 * pairs) + 2
        self.input = InputSpec("tokens", size=alphabet + pairs + n_pair_tokens, out_dim=alphabet, seq_len=length)
        self.setup(data_seed, eval_size)

    def set_progress(self, fraction):
        if self.curriculum == "grow":
            self.k_now = min(self.k, 1 + int(fraction / self.curriculum_frac * self.k))

    def sample(self, n, generator):
        A, P, dev = self.alphabet, self.pairs, self.device
        if self.k_now is None:
            k = torch.full((n, 1), self.k, device=dev)
        else:  # curriculum: hops per example uniform in 1..k_now
            k = torch.randint(1, self.k_now + 1, (n, 1), generator=generator, device=dev)
        perm = torch.rand(n, A, generator=generator, device=dev).argsort(-1)  # distinct symbols
        keys = perm[:, :P]  # keys[:, :k] is the chain q = keys[:, 0] -> keys[:, 1] -> ...
        # the answer: a symbol outside the chain (any of perm[:, k:], not only non-keys)
        pick = k + (torch.rand(n, 1, generator=generator, device=dev) * (A - k)).long()
        answer = perm.gather(1, pick)
        j = torch.arange(P, device=dev)
        nxt = torch.cat([keys[:, 1:], keys[:, :1]], 1)  # keys[:, j + 1]
        noise = torch.randint(0, A, (n, P), generator=generator, device=dev)
        values = torch.where(j < k - 1, nxt, torch.where(j == k - 1, answer, noise))
        order = torch.rand(n, P, generator=generator, device=dev).argsort(-1)  # shuffle the pairs
        keys, values = keys.gather(1, order), values.gather(1, order)
        if self.encoding == "pair":
            context = A + P + keys * A + values
        else:
            context = torch.stack([keys, values], -1).flatten(1)
        x = torch.cat([context, self.HOP + k - 1, perm[:, :1]], 1)
        y = torch.full_like(x, IGNORE)
        y[:, -1] = answer[:, 0]
        return x, y
