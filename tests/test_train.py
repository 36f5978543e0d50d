import math

import pytest
import torch

from archbench.model import build_model
from archbench.registry import BLOCKS
from archbench.tasks.teacher_student import TeacherStudent
from archbench.train import TrainConfig, make_scheduler, param_groups, scaled_lr, train


def setup(depth=2, seed=0):
    task = TeacherStudent(device="cpu", teacher_depth=4, dim=8, vocab=16, eval_batches=2)
    torch.manual_seed(seed)
    model = build_model(BLOCKS.get("residual-mlp").obj, {}, depth, task.input, width=8)
    return model, task


def lrs(cfg, lr=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = make_scheduler(opt, cfg, lr)
    out = []
    for step in range(cfg.steps):
        out.append(opt.param_groups[0]["lr"])
        if sched is not None:
            sched.step_update(step + 1)
    return out


def test_hold_then_decay_is_the_papers_schedule():
    # lr held for 80 % of training, then linearly down to 10 %.
    got = lrs(TrainConfig(steps=100, schedule="hold-decay", hold_frac=0.8, final_lr_frac=0.1))
    want = [1.0 if t < 80 else 1.0 - 0.9 * (t - 80) / 20 for t in range(100)]
    assert got == pytest.approx(want, abs=1e-9)


def test_cosine_with_warmup_and_constant():
    got = lrs(TrainConfig(steps=110, schedule="cosine", warmup_frac=10 / 110, final_lr_frac=0.0))
    assert got[0] == pytest.approx(0.01) and got[5] < got[10]
    assert got[10] == pytest.approx(1.0) and got[60] == pytest.approx(0.5, abs=1e-9)
    assert got[-1] < 0.01
    assert lrs(TrainConfig(steps=10)) == [1.0] * 10


def test_depth_scaled_lr():
    cfg = TrainConfig(lr=6e-4, lr_depth_ref=16)
    assert scaled_lr(cfg, 16) == pytest.approx(6e-4)
    assert scaled_lr(cfg, 64) == pytest.approx(6e-4 * 4 / 8)  # the paper's 6e-4·4/sqrt(ℓ)
    assert scaled_lr(TrainConfig(lr=1e-3), 64) == 1e-3


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_tensors_lr_scale_scales_its_rate_at_every_step(schedule):
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[1].weight.lr_scale = 0.25
    cfg = TrainConfig(steps=20, schedule=schedule, warmup_frac=0.1)
    opt = torch.optim.SGD(param_groups(model, 0.0), lr=2.0)
    sched = make_scheduler(opt, cfg, 2.0)
    for step in range(cfg.steps):
        rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        base = rate[id(model[0].weight)]
        assert rate[id(model[1].weight)] == pytest.approx(0.25 * base) and rate[id(model[1].bias)] == base
        if sched is not None:
            sched.step_update(step + 1)
    assert schedule == "constant" or base < 2.0  # the schedule moved both groups


def test_training_reduces_loss_and_repeats_exactly():
    cfg = TrainConfig(steps=60, batch_size=64, lr=3e-3, log_every=20)
    m1, task = setup()
    before = task.evaluate(m1, 64)["loss"]
    out1 = train(m1, task, cfg, seed=5, depth=2)
    m2, _ = setup()
    out2 = train(m2, task, cfg, seed=5, depth=2)
    assert out1.status == "ok" and out1.final_loss < 0.8 * before
    assert out1.final_loss == out2.final_loss and out1.history == out2.history
    assert [s for s, _ in out1.history] == [20, 40, 60]


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, log_every=10, checkpoint_every=20, schedule="cosine",
                      eval_every=10)
    ref_model, task = setup()
    ref = train(ref_model, task, cfg, seed=1, depth=2)
    # the held-out loss every eval_every steps, the last one the run's final loss
    assert [s for s, _ in ref.eval_history] == [10, 20, 30, 40] and ref.eval_history[-1][1] == ref.final_loss

    ckpt = tmp_path / "run.ckpt.pt"
    model, _ = setup()
    stop = {"at": 30}

    def interrupt(step, loss):
        if step == stop["at"]:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(model, task, cfg, seed=1, depth=2, checkpoint=ckpt, on_log=interrupt)
    assert ckpt.exists()  # saved at step 20
    fresh, _ = setup(seed=99)  # different init: everything must come from the checkpoint
    resumed = train(fresh, task, cfg, seed=1, depth=2, checkpoint=ckpt)
    assert resumed.final_loss == pytest.approx(ref.final_loss, rel=1e-6)
    assert [v for _, v in resumed.history] == pytest.approx([v for _, v in ref.history], rel=1e-6)
    assert [s for s, _ in resumed.eval_history] == [s for s, _ in ref.eval_history]
    assert [v for _, v in resumed.eval_history] == pytest.approx([v for _, v in ref.eval_history], rel=1e-6)


class Unnormed(torch.nn.Module):
    """x + W x with no normalisation: a large learning rate makes the stream overflow."""

    def __init__(self, dim, layer_idx, depth, **kw):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.lin(x)


def test_divergence_is_recorded_as_failed_with_its_step():
    _, task = setup()
    torch.manual_seed(0)
    model = build_model(Unnormed, {}, 8, task.input, width=8, zero_head=False)
    cfg = TrainConfig(steps=200, batch_size=32, lr=1e8, optimizer="sgd", log_every=5)
    out = train(model, task, cfg, seed=0, depth=2)
    assert out.status == "failed"
    assert not math.isfinite(out.final_loss)
    assert f"at step {out.steps_done}" in out.failure and out.steps_done < 200
