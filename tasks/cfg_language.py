"""Language modelling on a random probabilistic context-free grammar with a nesting-depth knob.

The grammar is a simple deterministic grammar: every rule's right-hand side starts with a
terminal, and the alternatives of a nonterminal start with different terminals. So the parse is
deterministic from the tokens read so far, a token's conditional entropy given its whole past
is exactly the entropy of the rule choice it reveals (zero for every other token), and the
grammar's entropy rate has a closed form. The random grammar has ``nesting`` levels: the start
symbol, then levels of ``nonterminals`` symbols whose rules open with a terminal, expand to one
or two symbols of the next level and close with a terminal that only a model which tracks the
open rules can predict; the last level emits terminals only.

Sequences are sentences joined by a separator, starting at a sentence boundary. The report
gives the model's cross-entropy next to ``optimal_ce`` (the exact Bayes cross-entropy of the
held-out windows) and ``entropy_rate`` (the grammar's, per token, separator included);
``excess_ce`` is the difference.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import numpy as np
import torch

import archbench
from archbench.errors import UsageError
from archbench.knobs import NON_NEGATIVE, POSITIVE, Range
from archbench.model import InputSpec
from archbench.task import EVAL_STREAM, SequenceTask

PAD = -1


@dataclasses.dataclass
class Grammar:
    """Terminals are 0..terminals-1, the separator is ``terminals``, nonterminals follow; 0 is the start."""

    terminals: int
    rules: list[list[tuple[float, list[int]]]]  # per nonterminal: (probability, rhs) with rhs symbol ids

    @classmethod
    def from_strings(cls, rules: dict[str, list[tuple[float, str]]], terminals: str) -> Grammar:
        """Readable grammars for tests: ``{"S": [(0.3, "aSb"), (0.7, "c")]}``, one character per symbol."""
        nts = list(rules)
        sym = {t: i for i, t in enumerate(terminals)} | {n: len(terminals) + 1 + i for i, n in enumerate(nts)}
        return cls(len(terminals), [[(p, [sym[c] for c in rhs]) for p, rhs in rules[n]] for n in nts])

    def __post_init__(self):
        V = self.terminals
        for a, alts in enumerate(self.rules):
            if abs(sum(p for p, _ in alts) - 1) > 1e-6:
                raise ValueError(f"nonterminal {a}: rule probabilities sum to {sum(p for p, _ in alts)}")
            leads = [rhs[0] for _, rhs in alts]
            if any(s >= V for s in leads) or len(set(leads)) != len(leads):
                raise ValueError(f"nonterminal {a}: every alternative must start with its own terminal")
        self.local_entropy = np.array([-sum(p * np.log(p) for p, _ in alts if p > 0) for alts in self.rules])
        # M[a, b]: expected count of nonterminal b in one expansion of a; t[a]: expected terminals
        n = len(self.rules)
        M, t = np.zeros((n, n)), np.zeros(n)
        for a, alts in enumerate(self.rules):
            for p, rhs in alts:
                for s in rhs:
                    if s > V:
                        M[a, s - V - 1] += p
                    else:
                        t[a] += p
        if np.max(np.abs(np.linalg.eigvals(M))) >= 1:
            raise ValueError("the grammar is not consistent: expected sentence length is infinite")
        solve = np.linalg.inv(np.eye(n) - M)
        self.sentence_entropy = float((solve @ self.local_entropy)[0])  # nats per sentence
        self.sentence_length = float((solve @ t)[0])  # terminals per sentence, separator excluded

    @property
    def entropy_rate(self) -> float:
        """Nats per token of the sentence stream, the separator counted as a token."""
        return self.sentence_entropy / (self.sentence_length + 1)

    def tables(self, device):
        """Padded tensors for generation: rule choices per nonterminal and right-hand sides."""
        n_alt = max(len(a) for a in self.rules)
        width = max(len(rhs) for alts in self.rules for _, rhs in alts)
        probs = torch.zeros(len(self.rules), n_alt)
        rhs = torch.full((len(self.rules), n_alt, width), PAD, dtype=torch.long)
        for a, alts in enumerate(self.rules):
            for r, (p, symbols) in enumerate(alts):
                probs[a, r] = p
                rhs[a, r, :len(symbols)] = torch.tensor(symbols)
        return probs.to(device), rhs.to(device), torch.tensor(self.local_entropy, dtype=torch.float).to(device)


def random_grammar(nesting: int, nonterminals: int, alternatives: int, terminals: int, seed: int) -> Grammar:
    """A random layered grammar: level 0 is the start symbol, levels 1..nesting-1 have ``nonterminals`` each."""
    rng = np.random.default_rng(seed)
    levels = [[0]] + [list(range(1 + i * nonterminals, 1 + (i + 1) * nonterminals)) for i in range(nesting - 1)]
    V = terminals
    rules = []
    for d, level in enumerate(levels):
        for _ in level:
            leads = rng.choice(terminals, size=alternatives, replace=False)
            probs = rng.dirichlet(np.ones(alternatives))
            alts = []
            for lead, p in zip(leads, probs):
                if d + 1 < len(levels):  # open, one or two children of the next level, close
                    kids = rng.choice(levels[d + 1], size=rng.integers(1, 3))
                    rhs = [int(lead)] + [V + 1 + int(c) for c in kids] + [int(rng.integers(terminals))]
                else:  # a leaf: its opening terminal and zero to two more
                    rhs = [int(lead)] + [int(s) for s in rng.integers(terminals, size=rng.integers(0, 3))]
                alts.append((float(p), rhs))
            rules.append(alts)
    return Grammar(terminals, rules)


def generate(grammar: Grammar, tables, n: int, length: int, generator: torch.Generator):
    """``n`` windows of ``length`` tokens of the sentence stream, each starting with a separator,
    and each token's conditional entropy given the tokens before it (nats).

    All nonterminals of a window expand in parallel, round after round; a window is cut to
    ``length`` after each round, which leaves its prefix's distribution unchanged.
    """
    probs, rhs, local = tables
    V, dev = grammar.terminals, probs.device
    start = grammar.terminals + 1
    seq = torch.tensor([V, start], device=dev).repeat((length + 1) // 2)[:length].expand(n, -1).clone()
    ent = torch.zeros(n, length, device=dev)
    width = rhs.shape[-1]
    offsets = torch.arange(width, device=dev)
    while True:
        is_nt = seq > V
        if not is_nt.any():
            return seq, ent
        nt = (seq - start).clamp(min=0)
        choice = torch.zeros_like(seq)
        choice[is_nt] = torch.multinomial(probs[nt[is_nt]], 1, generator=generator)[:, 0]
        expanded = torch.where(is_nt[..., None], rhs[nt, choice], torch.cat(
            [seq[..., None], torch.full((n, length, width - 1), PAD, device=dev)], -1))
        new_ent = torch.zeros(n, length, width, device=dev)
        new_ent[..., 0] = torch.where(is_nt, local[nt], ent)
        sizes = (expanded != PAD).sum(-1)
        target = (sizes.cumsum(1) - sizes)[..., None] + offsets
        keep = (expanded != PAD) & (target < length)
        rows = torch.arange(n, device=dev)[:, None, None].expand_as(target)
        seq = torch.full_like(seq, PAD)
        seq[rows[keep], target[keep]] = expanded[keep]
        ent = torch.zeros_like(ent)
        ent[rows[keep], target[keep]] = new_ent[keep]


@archbench.register_task("cfg-language", family="language",
                         citation="Allen-Zhu & Li 2023, Physics of Language Models part 1 (arXiv 2305.13673)")
class CFGLanguage(SequenceTask):
    """Next-token prediction on a random nested PCFG; cross-entropy reported beside the grammar's entropy rate."""

    default_evaluators = ("alpha-ell", "depth-to-solve")
    exclude_heldout = False  # a language: held-out windows are ordinary draws
    solve_metric = "excess_ce"
    presets = {
        "smoke": {"depths": [1, 2], "seeds": 1, "task": {"nesting": 2, "seq_len": 32, "eval_size": 128},
                  "model": {"width": 32}, "train": {"steps": 60, "batch_size": 32, "lr": 3e-3}},
        "quick": {"depths": [1, 2, 4], "seeds": 1, "task": {"seq_len": 48}, "model": {"width": 64},
                  "train": {"steps": 2000, "batch_size": 32, "lr": 2e-3, "schedule": "cosine", "warmup_frac": 0.05}},
        "paper": {"depths": [1, 2, 4, 8, 16], "seeds": 1, "task": {"nesting": 6, "seq_len": 256},
                  "model": {"width": 256},
                  "train": {"steps": 20_000, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.02}},
    }

    def __init__(self, *, device="cpu",
                 nesting: Annotated[int, Range(1, 8), POSITIVE] = 4,
                 nonterminals: Annotated[int, POSITIVE] = 3,
                 alternatives: Annotated[int, POSITIVE] = 3,
                 terminals: Annotated[int, POSITIVE] = 16,
                 grammar_seed: int = 0,
                 seq_len: Annotated[int, POSITIVE] = 64,
                 solve_gap: Annotated[float, NON_NEGATIVE] = 0.02,
                 data_seed: int = 0,
                 eval_size: Annotated[int, POSITIVE] = 512):
        super().__init__(device=device)
        if nesting < 1 or alternatives > terminals or alternatives < 1:
            raise UsageError(f"task.nesting={nesting}, task.alternatives={alternatives}: need nesting >= 1 and "
                             f"1 <= alternatives <= terminals ({terminals})")
        self.grammar = random_grammar(nesting, nonterminals, alternatives, terminals, grammar_seed)
        self.tables = self.grammar.tables(self.device)
        self.seq_len, self.solve_at = seq_len, solve_gap
        self.input = InputSpec("tokens", size=terminals + 1, out_dim=terminals + 1, seq_len=seq_len)
        self.setup(data_seed, eval_size)
        _, _, ent = self._windows(eval_size, torch.Generator(device=self.device).manual_seed(data_seed + EVAL_STREAM))
        self.heldout_entropy = ent
        self.loss_floor = ent.mean().item()  # the alpha_ell fit of excess cross-entropy

    def _windows(self, n, generator):
        seq, ent = generate(self.grammar, self.tables, n, self.seq_len + 1, generator)
        return seq[:, :-1], seq[:, 1:], ent[:, 1:]

    def sample(self, n, generator):
        return self._windows(n, generator)[:2]

    def metrics(self, logits, targets):
        return {"accuracy": (logits.argmax(-1) == targets).float().mean().item()}

    def evaluate(self, model, batch_size, autocast=None):
        out = super().evaluate(model, batch_size, autocast)
        ent = self.heldout_entropy
        out["optimal_ce"] = ent.mean().item()
        out["entropy_rate"] = self.grammar.entropy_rate
        out["excess_ce"] = out["loss"] - out["optimal_ce"]
        return out

    def solved(self, metrics):
        return bool(metrics["excess_ce"] <= self.solve_at)
