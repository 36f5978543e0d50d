"""Next-token prediction on a text in a pretrained model's own tokens: the data of ``archbench analyze``.

Not registered: it needs the pretrained model's tokenizer, so ``archbench eval`` cannot build it
from knobs; ``archbench.analyze`` makes one beside the model it loads (``archbench.hf``). The text
is the same default as lm-char's and lm-word's (Python's bundled docs, ``language.load_text``).
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F

from archbench.errors import ArchbenchError, UsageError
from archbench.knobs import POSITIVE
from archbench.model import InputSpec
from archbench.task import Task
from archbench.tasks.language import load_text

__all__ = ["HFTextTask"]


class HFTextTask(Task):
    """Next-token prediction on a text in a pretrained model's own tokens (evaluation only).

    The text is ``text_file`` or, by default, Python's bundled docs (as lm-char and lm-word use);
    it is tokenised without special tokens and cut into non-overlapping windows of ``seq_len``
    inputs (+1 token for the targets), keeping the first ``max_tokens // seq_len`` windows.
    Windows start mid-text, without a BOS token. Loss: mean next-token cross-entropy, nats/token.
    """

    loss_floor = None
    default_evaluators = ()
    unit = "token"

    def __init__(self, tokenizer, *, device: str | torch.device = "cpu", seq_len: Annotated[int, POSITIVE] = 128,
                 max_tokens: Annotated[int, POSITIVE] = 8192, text_file: str | None = None,
                 vocab_size: Annotated[int | None, POSITIVE] = None):
        super().__init__(device=device)
        if seq_len < 1:
            raise UsageError(f"seq_len={seq_len}: need at least 1")
        if max_tokens < seq_len:
            raise UsageError(f"max_tokens={max_tokens} is less than one window (seq_len={seq_len})")
        text = load_text(text_file)
        n_windows = max_tokens // seq_len
        # Tokenise a prefix large enough for the windows (a token is rarely > 12 characters), then all of it if short.
        chars = 16 * (n_windows * seq_len + 1)
        ids = self._tokenize(tokenizer, text[:chars])
        if len(ids) < n_windows * seq_len + 1 and chars < len(text):
            ids = self._tokenize(tokenizer, text)
        n_windows = min(n_windows, (len(ids) - 1) // seq_len)
        if n_windows < 1:
            source = text_file or "the default text"
            raise ArchbenchError(f"text_file: {source!r} has {len(ids)} tokens; seq_len={seq_len} needs at least "
                                 f"{seq_len + 1}")
        data = torch.tensor(ids[: n_windows * seq_len + 1], dtype=torch.long)
        starts = torch.arange(n_windows) * seq_len
        windows = data[starts[:, None] + torch.arange(seq_len + 1)]  # (n, T+1)
        self.x, self.y = windows[:, :-1].to(self.device), windows[:, 1:].to(self.device)
        self.seq_len, self.n_windows = seq_len, n_windows
        vocab = int(vocab_size or len(tokenizer))
        self.input = InputSpec("tokens", size=vocab, out_dim=vocab, seq_len=seq_len)
        self.text_source = str(text_file) if text_file else "pydoc_data.topics (Python's bundled docs)"
        self.tokenizer_name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__

    @staticmethod
    def _tokenize(tokenizer, text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def batch(self, batch_size, generator):
        raise ArchbenchError("HFTextTask is for evaluating a pretrained model; it has no training batches")

    def eval_batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if batch_size < 1:
            raise UsageError(f"batch_size={batch_size}: need at least 1")
        return list(zip(self.x.split(batch_size), self.y.split(batch_size)))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def describe(self) -> dict[str, Any]:
        return {"text": self.text_source, "tokens": self.n_windows * self.seq_len, "windows": self.n_windows,
                "seq_len": self.seq_len, "tokenizer": self.tokenizer_name, "vocab": self.input.size}
