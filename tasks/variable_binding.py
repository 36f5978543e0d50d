"""Variable binding: resolve a variable through a chain of assignments among distractor chains.

A program is a shuffle of ``1 + distractors`` chains, each a value bound and then copied
``hops - 1`` times (``a = 3 ; b = a ; c = b ;``), the statements of a chain in order but the
chains interleaved at random, followed by a query on the last variable of one chain (``c ?``).
The label, at the ``?``, is the chain's value. Every variable name occurs in one statement as
a target, so the answer is unambiguous. hops = 1 (``a = 3 ; … a ?``) is the control.
"""

from __future__ import annotations

from typing import Annotated

import torch

import archbench
from archbench.errors import UsageError
from archbench.knobs import NON_NEGATIVE, POSITIVE, Range
from archbench.model import InputSpec
from archbench.task import IGNORE, SequenceTask

TRAIN = {"lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.05, "grad_clip": 1.0}


@archbench.register_task("variable-binding", family="compositional",
                         citation="variable tracking as in Hsieh et al. 2024 (RULER) and Wu et al. 2025")
class VariableBinding(SequenceTask):
    """Resolve ``c ?`` through ``a = 3 ; b = a ; c = b ;`` interleaved with distractor chains; hops = 1 is the control."""

    presets = {
        "smoke": {"depths": [1, 2], "seeds": 1, "task": {"hops": 1, "distractors": 1, "eval_size": 256},
                  "model": {"width": 32}, "train": {**TRAIN, "steps": 60, "batch_size": 64, "lr": 3e-3}},
        "quick": {"depths": [1, 2, 3, 4, 6], "seeds": 1, "task": {"distractors": 2}, "model": {"width": 64},
                  "train": {**TRAIN, "steps": 3000, "batch_size": 128}},
        "paper": {"depths": [1, 2, 3, 4, 6, 8, 12], "seeds": 1, "task": {"distractors": 4, "names": 64},
                  "model": {"width": 256}, "train": {**TRAIN, "steps": 20_000, "batch_size": 256}},
    }

    def __init__(self, *, device="cpu",
                 hops: Annotated[int, Range(1, 8), POSITIVE] = 3,
                 distractors: Annotated[int, Range(0, 8), NON_NEGATIVE] = 2,
                 names: Annotated[int, POSITIVE] = 32,
                 values: Annotated[int, POSITIVE] = 10,
                 data_seed: int = 0,
                 eval_size: Annotated[int, POSITIVE] = 1024):
        super().__init__(device=device)
        chains = 1 + distractors
        if hops < 1 or distractors < 0:
            raise UsageError(f"task.hops={hops}, task.distractors={distractors}: need hops >= 1 and distractors >= 0")
        if names < chains * hops:
            raise UsageError(f"task.names={names}: {chains} chains of {hops} hops need at least "
                             f"{chains * hops} distinct variable names")
        self.hops, self.chains, self.names, self.values = hops, chains, names, values
        self.EQ, self.END, self.ASK = names + values, names + values + 1, names + values + 2
        self.input = InputSpec("tokens", size=names + values + 3, out_dim=names + values,
                               seq_len=4 * chains * hops + 2)
        self.setup(data_seed, eval_size)

    def sample(self, n, generator):
        C, L, dev = self.chains, self.hops, self.device
        names = torch.rand(n, self.names, generator=generator, device=dev).argsort(-1)[:, :C * L].view(n, C, L)
        value = self.names + torch.randint(0, self.values, (n, C), generator=generator, device=dev)
        # statement s of chain c: names[c, s] = (value if s == 0 else names[c, s - 1])
        rhs = torch.cat([value[:, :, None], names[:, :, :-1]], 2)
        # interleave: a random order of the C·L statements that keeps each chain's own order
        chain_of = torch.arange(C, device=dev).repeat_interleave(L).expand(n, -1)
        slot = chain_of.gather(1, torch.rand(n, C * L, generator=generator, device=dev).argsort(-1))
        step = (torch.nn.functional.one_hot(slot, C).cumsum(1).gather(2, slot[..., None])[..., 0]) - 1
        lhs_tok, rhs_tok = names[torch.arange(n, device=dev)[:, None], slot, step], \
            rhs[torch.arange(n, device=dev)[:, None], slot, step]
        eq, end = torch.full_like(lhs_tok, self.EQ), torch.full_like(lhs_tok, self.END)
        program = torch.stack([lhs_tok, eq, rhs_tok, end], -1).flatten(1)
        asked = torch.randint(0, C, (n,), generator=generator, device=dev)
        query = names[torch.arange(n, device=dev), asked, L - 1]
        x = torch.cat([program, query[:, None], torch.full_like(query[:, None], self.ASK)], 1)
        y = torch.full_like(x, IGNORE)
        y[:, -1] = value[torch.arange(n, device=dev), asked]
        return x, y
