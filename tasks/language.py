"""Language modelling on text that every Python install carries offline: by character or by word.

The default corpus is the English reference text bundled with CPython (``pydoc_data.topics``,
about 465k characters); ``--set task.text_file=PATH`` uses a user's own text instead. The last
``val_fraction`` of the text is held out; training windows come from the rest.
"""

from __future__ import annotations

import collections
import math
import re
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F

import archbench
from archbench.errors import ArchbenchError
from archbench.knobs import FRACTION, POSITIVE
from archbench.model import InputSpec
from archbench.task import Task, pure_loss


def default_corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def load_text(text_file: str | None) -> str:
    if text_file is None:
        return default_corpus()
    path = Path(text_file)
    if not path.is_file():
        raise ArchbenchError(f"task.text_file: {text_file!r} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ArchbenchError(f"task.text_file: {text_file!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None


class TextLM(Task):
    """Next-token prediction on a token stream; a subclass turns text into token ids (``tokenize``)."""

    loss_floor = None  # the text's entropy is unknown: the alpha_ell fit estimates a floor
    unit = "token"

    def tokenize(self, text: str, n_train_chars: int) -> tuple[list[int], list[str]]:
        """Token ids of ``text`` and the vocabulary; built from the first ``n_train_chars`` only."""
        raise NotImplementedError

    def __init__(self, *, device="cpu", seq_len: Annotated[int, POSITIVE] = 64, text_file: str | None = None,
                 val_fraction: Annotated[float, FRACTION] = 0.1, eval_batches: Annotated[int, POSITIVE] = 8):
        super().__init__(device=device)
        text = load_text(text_file)
        ids, self.vocab = self.tokenize(text, int(len(text) * (1 - val_fraction)))
        if len(ids) < 4 * (seq_len + 1):
            raise ArchbenchError(f"task.text_file: the text has {len(ids)} {self.unit}s; "
                                 f"seq_len={seq_len} needs at least {4 * (seq_len + 1)}")
        data = torch.tensor(ids, dtype=torch.long)
        n_val = max(int(len(data) * val_fraction), seq_len + 1)
        self.train_data, self.val_data = data[:-n_val].to(self.device), data[-n_val:].to(self.device)
        self.seq_len, self.n_eval = seq_len, eval_batches
        self.input = InputSpec("tokens", size=len(self.vocab), out_dim=len(self.vocab), seq_len=seq_len)
        self._eval: dict[int, list] = {}

    def _windows(self, data, starts):
        idx = starts[:, None] + torch.arange(self.seq_len + 1, device=self.device)
        chunk = data[idx]  # (B, T+1)
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, batch_size, generator):
        high = len(self.train_data) - self.seq_len - 1
        starts = torch.randint(0, high, (batch_size,), generator=generator, device=self.device)
        return self._windows(self.train_data, starts)

    @pure_loss
    def loss(self, logits, targets):
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def metrics(self, logits, targets):
        acc = (logits.argmax(-1) == targets).float().mean().item()
        return {"accuracy": acc, f"bits_per_{self.unit}": self.loss(logits, targets).item() / math.log(2)}

    def eval_batches(self, batch_size):
        if batch_size not in self._eval:  # evenly spaced windows over the held-out tail of the text
            n = self.n_eval * batch_size
            starts = torch.linspace(0, len(self.val_data) - self.seq_len - 1, n, device=self.device).long()
            self._eval[batch_size] = [self._windows(self.val_data, s) for s in starts.split(batch_size)]
        return self._eval[batch_size]


@archbench.register_task("lm-char", family="language")
class CharLM(TextLM):
    """Next-character prediction on Python's bundled docs (or your own text file); loss in nats/char."""

    unit = "char"
    presets = {
        "smoke": {"depths": [3, 6, 12], "seeds": 1, "task": {"seq_len": 32, "eval_batches": 2},
                  "model": {"width": 32}, "train": {"steps": 60, "batch_size": 16, "lr": 3e-3}},
        "quick": {"depths": [3, 6, 12], "seeds": 1, "task": {"seq_len": 64}, "model": {"width": 64},
                  "train": {"steps": 1500, "batch_size": 32, "lr": 2e-3, "schedule": "cosine", "warmup_frac": 0.05}},
        # one trial of the default search: one depth, one seed, about 1.5 minutes on one CPU core
        "search": {"depths": [4], "seeds": 1, "task": {"seq_len": 64}, "model": {"width": 64},
                   "train": {"steps": 1000, "batch_size": 32, "lr": 2e-3, "schedule": "cosine", "warmup_frac": 0.05}},
        "paper": {"depths": [3, 6, 12, 24], "seeds": 1, "task": {"seq_len": 256}, "model": {"width": 256},
                  "train": {"steps": 20_000, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.02}},
    }

    def tokenize(self, text, n_train_chars):
        chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(chars)}
        return [lookup[c] for c in text], chars

    @property
    def chars(self) -> list[str]:
        return self.vocab


WORD = re.compile(r"[A-Za-z]+|\d+|\n|[^\sA-Za-z\d]")


@archbench.register_task("lm-word", family="language")
class WordLM(TextLM):
    """Next-word prediction on Python's bundled docs (or your own text file): lower-cased words, digits, punctuation."""

    unit = "word"
    presets = {
        "smoke": {"depths": [3, 6, 12], "seeds": 1, "task": {"seq_len": 16, "eval_batches": 2, "vocab_size": 512},
                  "model": {"width": 32}, "train": {"steps": 60, "batch_size": 16, "lr": 3e-3}},
        "quick": {"depths": [3, 6, 12], "seeds": 1, "task": {"seq_len": 32}, "model": {"width": 64},
                  "train": {"steps": 1500, "batch_size": 32, "lr": 2e-3, "schedule": "cosine", "warmup_frac": 0.05}},
        "paper": {"depths": [3, 6, 12, 24], "seeds": 1, "task": {"seq_len": 128}, "model": {"width": 256},
                  "train": {"steps": 20_000, "batch_size": 64, "lr": 1e-3, "schedule": "cosine", "warmup_frac": 0.02}},
    }

    def __init__(self, *, device="cpu", seq_len: Annotated[int, POSITIVE] = 32, text_file: str | None = None,
                 vocab_size: Annotated[int, POSITIVE] = 4096, val_fraction: Annotated[float, FRACTION] = 0.1,
                 eval_batches: Annotated[int, POSITIVE] = 8):
        if vocab_size < 2:
            raise ArchbenchError(f"task.vocab_size={vocab_size}: need at least 2 (one word and <unk>)")
        self.vocab_size = vocab_size
        super().__init__(device=device, seq_len=seq_len, text_file=text_file, val_fraction=val_fraction,
                         eval_batches=eval_batches)

    def tokenize(self, text, n_train_chars):
        """Words of the training part by frequency (ties alphabetical), ``<unk>`` for the rest; newlines are tokens."""
        words = [w.lower() for w in WORD.findall(text)]
        counts = collections.Counter(w.lower() for w in WORD.findall(text[:n_train_chars]))
        vocab = ["<unk>"] + sorted(counts, key=lambda w: (-counts[w], w))[:self.vocab_size - 1]
        lookup = {w: i for i, w in enumerate(vocab)}
        return [lookup.get(w, 0) for w in words], vocab
