"""k-hop induction heads (Sanford, Hsu, Telgarsky 2024), as the authors train and score it.

A sequence is one token naming the hop count k, then a string of ``seq_len`` characters over an
alphabet of ``chars`` with no character twice in a row. Every character position i is labelled with
hop_k(i): hop_0(i) = x_i, hop_1(i) = the character right after the previous occurrence of x_i, and
hop_k follows that pointer k times, i.e. hop_k(i) = x_{p^k(i)} with p(i) = 1 + (the last j < i with
x_j = x_i). Where a pointer runs off the start (no earlier occurrence) the label is "does not exist",
one more class. k is drawn uniformly from 0..``max_hops`` for every training sequence, fresh each
step; the held-out set has ``eval_per_k`` sequences of every k, and ``error_k0``, ``error_k1``, ...
are the fractions of wrong positions at each k (chance ≈ 1 − 1/chars). A transformer can follow the
pointers by doubling (hop_2k from two hop_k), so the depth needed grows like log k: the authors' models
of depth L solve k ≈ 2^(L−2).
"""

from __future__ import annotations

from typing import Annotated

import contextlib

import torch

import archbench
from archbench.knobs import POSITIVE, Range
from archbench.model import InputSpec
from archbench.task import IGNORE, SequenceTask

PAPER_3 = "Sanford, Hsu, Telgarsky 2024, Transformers, Parallel Computation, and Logarithmic Depth (arXiv 2402.09268)"


def hop_targets(chars: torch.Tensor, k: torch.Tensor, alphabet: int, max_hops: int) -> torch.Tensor:
    """hop_k at every position of ``chars`` (n, T) over characters 0..alphabet-1, ``k`` (n,) hops per row
    (at most ``max_hops``); ``alphabet`` (one more class) where it does not exist."""
    n, T = chars.shape
    pos = torch.arange(T, device=chars.device).expand(n, T)
    # last[:, a, i]: the last position <= i holding character a (-1: none yet)
    at = torch.where(chars.unsqueeze(1) == torch.arange(alphabet, device=chars.device).view(1, -1, 1),
                     pos.unsqueeze(1), -1)
    last = at.cummax(-1).values
    before = torch.cat([torch.full_like(last[..., :1], -1), last[..., :-1]], -1)  # last position < i
    prev = before.gather(1, chars.unsqueeze(1)).squeeze(1)  # (n, T)
    step = torch.where(prev >= 0, prev + 1, -1)  # the pointer p(i); -1: does not exist
    cur = pos.clone()
    for h in range(max_hops):
        moving = (h < k).unsqueeze(1) & (cur >= 0)
        cur = torch.where(moving, step.gather(1, cur.clamp(min=0)), cur)
    return torch.where(cur >= 0, chars.gather(1, cur.clamp(min=0)), alphabet)


@archbench.register_task("hop-induction", family="compositional", citation=PAPER_3)
class HopInduction(SequenceTask):
    """Sanford et al.'s k-hop induction: every position's hop_k over a 4-character string; error per k."""

    default_evaluators = ("error-by-k",)
    scores_each_k = True  # held-out metrics error_k0, error_k1, ... (the error-by-k evaluator reads them)
    presets = {
        "smoke": {"depths": [1, 2], "seeds": 1,
                  "task": {"seq_len": 24, "max_hops": 2, "eval_per_k": 32},
                  "model": {"width": 32}, "block": {"heads": 2},
                  "train": {"steps": 60, "batch_size": 32, "lr": 3e-3, "warmup_frac": 0.1}},
        # About 15 minutes per seed on a 2-core CPU (one core each, compiled): shorter strings, k up to 8,
        # a larger lr. residual then solves k <= L - 1 at depth L = 1..4 (calibrated in issue 19).
        "quick": {"depths": [1, 2, 3, 4], "seeds": 3,
                  "task": {"seq_len": 48, "max_hops": 8, "eval_per_k": 64},
                  "model": {"width": 64}, "block": {"heads": 4},
                  "train": {"steps": 3000, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.05,
                            "eval_every": 500}},
        # One trial of the default search (`archbench search --preset search`): the quick budget at its
        # deepest model only, one seed (the objectives read the deepest model; confirmation adds seeds).
        "search": {"depths": [4], "seeds": 1,
                   "task": {"seq_len": 48, "max_hops": 8, "eval_per_k": 64},
                   "model": {"width": 64}, "block": {"heads": 4},
                   "train": {"steps": 3000, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.05,
                             "eval_every": 500}},
        # The authors' run (App. G, d = 128 with 4 heads): depths 2-6, 100k steps of batch 32, Adam at 1e-4
        # after 1,000 warm-up steps, then constant; fp32, since nothing says they trained in lower precision.
        "paper": {"depths": [2, 3, 4, 5, 6], "seeds": 1,
                  "task": {"seq_len": 100, "max_hops": 16, "chars": 4},
                  "model": {"width": 128}, "block": {"heads": 4},
                  "train": {"steps": 100_000, "batch_size": 32, "lr": 1e-4, "warmup_frac": 0.01,
                            "precision": "fp32", "eval_every": 5000}},
    }

    def __init__(self, *, device="cpu",
                 seq_len: Annotated[int, Range(4, 1024), POSITIVE] = 100,
                 # with no character twice in a row, 2 characters alternate and every hop is trivial
                 chars: Annotated[int, Range(3, 64)] = 4,
                 max_hops: Annotated[int, Range(0, 64)] = 16,
                 data_seed: int = 0,
                 eval_per_k: Annotated[int, POSITIVE] = 64):
        super().__init__(device=device)
        self.seq_len, self.chars, self.max_hops, self.eval_per_k = seq_len, chars, max_hops, eval_per_k
        self.HOP = chars + 1  # tokens: characters, "does not exist" (= chars), hop counts HOP + k
        self.input = InputSpec("tokens", size=chars + 2 + max_hops, out_dim=chars + 1, seq_len=seq_len + 1)
        self.eval_k = torch.arange(max_hops + 1, device=self.device).repeat_interleave(eval_per_k)
        self.setup(data_seed, len(self.eval_k))

    def sample(self, n, generator, k: torch.Tensor | None = None):
        dev, C = self.device, self.chars
        if k is None:
            k = torch.randint(0, self.max_hops + 1, (n,), generator=generator, device=dev)
        first = torch.randint(0, C, (n, 1), generator=generator, device=dev)
        # no immediate repeats: each next character is the previous plus 1..C-1 (mod C), uniform
        shifts = torch.randint(1, C, (n, self.seq_len - 1), generator=generator, device=dev)
        chars = torch.cat([first, shifts], 1).cumsum(1) % C
        x = torch.cat([(self.HOP + k).unsqueeze(1), chars], 1)
        y = torch.cat([torch.full((n, 1), IGNORE, device=dev), hop_targets(chars, k, C, self.max_hops)], 1)
        return x, y

    def headline_metric(self):  # the hardest k trained: what composition buys
        return f"error_k{self.max_hops}"

    def heldout_sample(self, n, generator):  # eval_per_k sequences of every k, in order of k
        return self.sample(n, generator, self.eval_k)

    @torch.no_grad()
    def evaluate(self, model, batch_size, autocast=None):
        """Held-out loss and accuracy over every labelled position, and ``error_kK``: the fraction of wrong
        positions at each k."""
        was_training = model.training
        model.eval()
        wrong, labelled, loss = [], [], 0.0
        batches = self.eval_batches(batch_size)
        for x, y in batches:
            with autocast or contextlib.nullcontext():
                logits = model(x).float()
            loss += self.loss(logits, y).item() * (y != IGNORE).sum().item()
            scored = y != IGNORE
            wrong.append(((logits.argmax(-1) != y) & scored).sum(1))
            labelled.append(scored.sum(1))
        model.train(was_training)
        wrong, labelled = torch.cat(wrong).double(), torch.cat(labelled).double()
        out = {"loss": loss / labelled.sum().item(), "accuracy": 1 - (wrong.sum() / labelled.sum()).item()}
        for k in range(self.max_hops + 1):
            at = self.eval_k == k
            out[f"error_k{k}"] = (wrong[at].sum() / labelled[at].sum()).item()
        return out
