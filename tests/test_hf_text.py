"""archbench.tasks.hf_text: next-token windows of a text in a pretrained model's own tokens (HFTextTask)."""

import pytest
import torch

from archbench.errors import ArchbenchError, UsageError
from archbench.tasks.hf_text import HFTextTask


def test_text_task(smollm2, tmp_path):
    model, tokenizer = smollm2
    task = HFTextTask(tokenizer, seq_len=32, max_tokens=64)
    (bx, by), = task.eval_batches(2)
    assert bx.shape == by.shape == (2, 32) and bx.dtype == torch.long
    assert torch.equal(bx[:, 1:], by[:, :-1]) and bx[1, 0] == by[0, -1]  # consecutive, non-overlapping windows
    assert [b[0].shape[0] for b in task.eval_batches(1)] == [1, 1]
    assert task.input.kind == "tokens" and task.input.size == task.input.out_dim == 49152 and task.input.seq_len == 32
    with torch.no_grad():
        logits = model.hf(input_ids=task.x, use_cache=False).logits
    assert task.loss_floor is None and task.solved({}) is None and task.metrics(logits, by) == {}
    d = task.describe()
    assert d["tokens"] == 64 and d["seq_len"] == 32 and "pydoc" in d["text"]
    loss = task.loss(logits, by).item()
    assert 1.0 < loss < 6.0, loss  # nats/token of a small LM on English docs
    (tmp_path / "short.txt").write_text("Too short.")
    with pytest.raises(ArchbenchError) as e:
        HFTextTask(tokenizer, seq_len=32, text_file=str(tmp_path / "short.txt"))
    assert "\n" not in str(e.value) and "seq_len=32" in str(e.value)
    with pytest.raises(UsageError):
        HFTextTask(tokenizer, seq_len=32, max_tokens=16)
