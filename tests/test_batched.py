"""The batched engine trains a sweep's runs together and gives the plain loop's losses.

Tolerance: on a CPU the two paths agree to float32 rounding, stated here as 1e-5 relative on every
logged training loss and on the held-out loss (in practice they agree bitwise: vmap runs the same
kernels). Compiled (``--compile on``), the fused kernels sum in another order and the teacher runs on
several steps' inputs at once: 1e-4 over these 60 steps (measured: within 2e-6). On CUDA the grouped
matmuls may sum in another order, so the GPU test allows 2e-3.
"""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from archbench.config import EvalSpec
from archbench.sweep import run_eval

RTOL = 1e-5
COMPILED_RTOL = 1e-4


def _losses(result):
    return {(tuple(sorted(r["vary"].items())), r["depth"], r["seed"]): r for r in result["runs"]}


def _records(runs_dir):
    return {p.stem: json.loads(p.read_text()) for p in (runs_dir / "records").glob("*.json")}


def _same(a, b, rtol=RTOL):
    assert a.keys() == b.keys()
    for key in a:
        ra, rb = a[key], b[key]
        assert ra["final_loss"] == pytest.approx(rb["final_loss"], rel=rtol), key
        for field in ("history", "eval_history"):
            ha, hb = ra[field], rb[field]
            assert [s for s, _ in ha] == [s for s, _ in hb]
            assert [v for _, v in ha] == pytest.approx([v for _, v in hb], rel=rtol), key


@pytest.mark.parametrize("sets", [
    # temperatures share one teacher forward per step; two seeds; two depths -> two groups of four
    {"task": {"temperature": "1,0.25"}, "train": {"steps": "60"}},
    # exp-9-3: the teacher's frozen head shared by students whose logits are divided by their own T,
    # with held-out losses along the way
    {"task": {"temperature": "1,0.25", "head": "teacher", "teacher": "tied"}, "train": {"steps": "60", "eval_every": "20"}},
    # per-run gradient clipping and timm's weight-decay groups, with a warmup-cosine schedule
    {"train": {"steps": "60", "grad_clip": "0.05", "optimizer": "adamw", "weight_decay": "0.1",
               "schedule": "cosine", "warmup_frac": "0.2"}},
])
def test_batched_training_gives_the_plain_loops_losses(tmp_path, sets):
    common = dict(block="residual-mlp", task="teacher-student", preset="smoke", depths=[2, 4], seeds=2, sets=sets,
                  evaluators=["alpha-ell"], device="cpu", plots=False)
    fast = run_eval(EvalSpec(**common, engine="batched", runs_dir=str(tmp_path / "fast")))
    plain = run_eval(EvalSpec(**common, engine="plain", runs_dir=str(tmp_path / "plain")))
    rf, rp = _records(tmp_path / "fast"), _records(tmp_path / "plain")
    assert rf.keys() == rp.keys()  # the engine is not part of what determines a run
    _same(rf, rp)
    n = len(rf)
    assert n == (8 if "task" in sets else 4)
    evals = sets["train"].get("eval_every")
    assert all(len(r["eval_history"]) == (3 if evals else 0) for r in rf.values())
    assert all(r["engine"]["name"] == "batched" and r["engine"]["runs"] == n for r in rf.values())
    assert all(r["engine"] == {"name": "plain"} for r in rp.values())
    fits = [res["metrics"]["alpha-ell"].get("points", [res["metrics"]["alpha-ell"]]) for res in (fast, plain)]
    assert [f["value"] for f in fits[0]] == pytest.approx([f["value"] for f in fits[1]], rel=1e-4)


def test_per_tensor_learning_rates_are_the_same_in_both_engines(tmp_path):
    # depth-µP scales the blocks' rate by 1/√(L/L₀) (archbench.train.param_groups), through a warmup-cosine schedule
    common = dict(block="completep", task="teacher-student", preset="smoke", depths=[2, 8], seeds=2, device="cpu",
                  sets={"block": {"alpha": "0.5"}, "train": {"steps": "40", "schedule": "cosine", "warmup_frac": "0.2"}},
                  evaluators=["alpha-ell"], plots=False)
    run_eval(EvalSpec(**common, engine="batched", runs_dir=str(tmp_path / "fast")))
    run_eval(EvalSpec(**common, engine="plain", runs_dir=str(tmp_path / "plain")))
    _same(_records(tmp_path / "fast"), _records(tmp_path / "plain"))


def test_compiled_training_gives_the_plain_loops_losses_across_checkpoints(tmp_path):
    # the teacher's forward on 16 steps' inputs at once, in chunks that stop at each checkpoint (24, 48)
    sets = {"task": {"temperature": "1,0.25", "head": "teacher"},
            "train": {"steps": "60", "checkpoint_every": "24", "eval_every": "20"}}
    common = dict(block="residual-mlp", task="teacher-student", preset="smoke", depths=[2, 4], seeds=1, sets=sets,
                  evaluators=["alpha-ell"], device="cpu", plots=False)
    run_eval(EvalSpec(**common, engine="batched", compile="on", runs_dir=str(tmp_path / "fast")))
    run_eval(EvalSpec(**common, engine="plain", runs_dir=str(tmp_path / "plain")))
    rf = _records(tmp_path / "fast")
    _same(rf, _records(tmp_path / "plain"), rtol=COMPILED_RTOL)
    assert all(r["engine"] == {"name": "batched", "runs": 4, "wall_s": r["engine"]["wall_s"], "compiled": True}
               for r in rf.values())


def test_teacher_student_draws_many_steps_as_one_by_one():
    from archbench.registry import TASKS
    from archbench.sweep import make_task

    task = make_task(TASKS.get("teacher-student"), {"teacher_depth": 8, "teacher": "tied"}, torch.device("cpu"))
    ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    many, one = task.draw_many(64, ga, 5), [task.draw(64, gb) for _ in range(5)]
    assert len(many) == 5 and torch.equal(ga.get_state(), gb.get_state())
    for (xa, la), (xb, lb) in zip(many, one):
        assert torch.equal(xa, xb)
        torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-6)


def test_sequence_task_with_attention_batches_exactly(tmp_path):
    common = dict(block="residual", task="cfg-language", preset="smoke", depths=[1, 2], seeds=2,
                  sets={"train": {"steps": "25"}}, evaluators=["alpha-ell"], device="cpu", plots=False)
    run_eval(EvalSpec(**common, engine="batched", runs_dir=str(tmp_path / "fast")))
    run_eval(EvalSpec(**common, engine="plain", runs_dir=str(tmp_path / "plain")))
    _same(_records(tmp_path / "fast"), _records(tmp_path / "plain"))


def test_runs_at_different_sequence_lengths_train_together_in_groups_of_their_own(tmp_path):
    # task.seq_len changes the model's input (its positions), so each length is a group of its own
    common = dict(block="residual", task="word-problem", preset="smoke", depths=[1], seeds=1,
                  sets={"task": {"seq_len": "4,6"}, "train": {"steps": "25"}}, evaluators=["depth-to-solve"],
                  device="cpu", plots=False)
    run_eval(EvalSpec(**common, engine="batched", runs_dir=str(tmp_path / "fast")))  # batched: insists
    run_eval(EvalSpec(**common, engine="plain", runs_dir=str(tmp_path / "plain")))
    fast = _records(tmp_path / "fast")
    assert all(r["engine"]["name"] == "batched" and r["engine"]["runs"] == 2 for r in fast.values())
    _same(fast, _records(tmp_path / "plain"))


def test_a_diverging_run_fails_alone(tmp_path):
    """A run whose loss turns NaN is recorded as failed at that step; its group goes on unchanged."""
    from archbench.batched import Job, train_batched
    from archbench.registry import BLOCKS, TASKS
    from archbench.config import resolve_config
    from archbench.sweep import make_task, new_model
    from archbench.train import TrainConfig, train

    c = resolve_config(EvalSpec(preset="smoke"))
    task = make_task(TASKS.get("teacher-student"), c.task, torch.device("cpu"))
    cfg = TrainConfig(**{**c.train, "steps": 30, "log_every": 5})

    def jobs():
        return [Job(new_model(BLOCKS.get("residual-mlp"), c, 3, s, task), task, cfg, s, 3, "3") for s in range(3)]

    batch = jobs()
    with torch.no_grad():
        next(batch[1].model.parameters()).fill_(float("nan"))
    out = train_batched(batch)
    assert out[1].status == "failed" and out[1].failure == "loss became nan at step 5" and out[1].steps_done == 5
    for i in (0, 2):
        ref = train(jobs()[i].model, task, cfg, seed=i, depth=3)
        assert out[i].status == "ok" and out[i].final_loss == pytest.approx(ref.final_loss, rel=RTOL)


def test_unbatchable_runs_fall_back_to_the_plain_loop_or_are_refused(main, tmp_path):
    # drop_path draws random numbers in training: vmap cannot reproduce the plain loop's draws
    args = ["eval", "--block", "residual", "--preset", "smoke", "--depths", "2,3", "--set", "train.steps=5",
            "--set", "block.drop_path=0.1", "--evaluators", "alpha-ell"]
    r = main(*args, "--runs-dir", tmp_path / "a", "--out", tmp_path / "a.json")
    assert r.returncode == 0, r.stderr
    assert "training one run at a time: the model cannot be vmapped" in r.stderr
    recs = _records(tmp_path / "a")
    assert len(recs) == 2 and all(rec["engine"] == {"name": "plain"} for rec in recs.values())
    r = main(*args, "--engine", "batched", "--runs-dir", tmp_path / "b", "--out", tmp_path / "b.json")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--engine batched: these runs cannot be trained together" in r.stderr and "--engine plain" in r.stderr
    assert not list((tmp_path / "b").glob("records/*.json"))


def test_killed_batch_resumes_to_the_same_losses(main, tmp_path):
    def args(runs):
        return ["eval", "--preset", "smoke", "--depths", "1,2", "--set", "train.steps=300",
                "--set", "train.checkpoint_every=50", "--evaluators", "alpha-ell",
                "--runs-dir", str(runs), "--out", str(runs / "r.json")]

    # a process of its own, killed as hard as a crash once the batch's first checkpoint is written
    proc = subprocess.Popen([sys.executable, "-m", "archbench", *args(tmp_path / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = tmp_path / "killed" / "records"
    deadline = time.time() + 240
    while time.time() < deadline and not list(records.glob("*.ckpt.pt")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(records.glob("*.ckpt.pt")) and not list(records.glob("*.json")), "killed mid-batch"
    for runs in (tmp_path / "killed", tmp_path / "whole"):
        done = main(*args(runs))
        assert done.returncode == 0, done.stderr
    assert not list(records.glob("*.ckpt.pt"))
    # a kill can land between the runs' checkpoints: the resumed runs then train in other groups, whose vmapped
    # kernels sum in another order (round-off, 1e-5 after 300 steps on a loaded CI machine); a resume that lost
    # a step or the optimizer's state would be off by far more
    _same(_records(tmp_path / "killed"), _records(tmp_path / "whole"), rtol=COMPILED_RTOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_matches_plain_on_cuda_with_bf16(tmp_path):
    common = dict(block="residual-mlp", task="teacher-student", preset="smoke", depths=[2, 4], seeds=2,
                  sets={"train": {"steps": "40", "precision": "fp32"}}, evaluators=["alpha-ell"], device="cuda",
                  plots=False)
    run_eval(EvalSpec(**common, engine="batched", runs_dir=str(tmp_path / "fast")))
    run_eval(EvalSpec(**common, engine="plain", runs_dir=str(tmp_path / "plain")))
    _same(_records(tmp_path / "fast"), _records(tmp_path / "plain"), rtol=2e-3)
    bf16 = {**common, "sets": {"train": {"steps": "40", "precision": "bf16"}}}
    res = run_eval(EvalSpec(**bf16, engine="batched", runs_dir=str(tmp_path / "bf16")))
    assert all(r["status"] == "ok" for r in res["runs"])
