"""`archbench bench`: the record it writes is complete and consistent (its speed is not asserted)."""

import json

import pytest
import torch

from archbench.nn import flop_counter


def _residual_lm(width, seq_len):
    from archbench.registry import BLOCKS, TASKS
    from archbench.config import EvalSpec, resolve_config
    from archbench.sweep import make_task, new_model

    c = resolve_config(EvalSpec(block="residual", task="lm-char", preset="quick",
                                sets={"model": {"width": str(width)}, "task": {"seq_len": str(seq_len)}}))
    task = make_task(TASKS.get("lm-char"), c.task, torch.device("cpu"))
    return task, lambda depth: new_model(BLOCKS.get("residual"), c, depth, 0, task)


def training_step_flops(batch, seq_len, width, depth, vocab, mlp_ratio=4):
    """Matmuls: qkv 3w², out w², MLP 2·r·w² per token and layer, readout w·V; forward ×3 for a step.
    Attention: QKᵀ and AV, 2·T²·w each per sequence and layer; torch counts its backward as 2.5× forward."""
    tokens = batch * seq_len
    matmul = depth * 2 * tokens * width * width * (3 + 1 + 2 * mlp_ratio) + 2 * tokens * width * vocab
    attention = depth * 4 * batch * seq_len * seq_len * width
    return 3 * matmul + 3.5 * attention


def test_flop_counter_counts_attention_on_cpu():
    task, model_at = _residual_lm(width=32, seq_len=16)
    model = model_at(2)
    x, y = task.batch(3, torch.Generator().manual_seed(0))
    counter = flop_counter()
    with counter:
        task.loss(model(x), y).backward()
    assert counter.get_total_flops() == training_step_flops(3, 16, 32, 2, task.input.out_dim)


def _consistent(row, batch, steps_per_flops=None):
    assert row["samples_per_s"] > 0 and row["peak_rss_gib_so_far"] > 0
    assert row["fraction_of_matmul_peak"] > 0
    if "flops_per_step" in row:  # steps/s × FLOPs per step
        steps_per_s = row["samples_per_s"] / (row["students"] * batch)
        assert row["achieved_flops_per_s"] == pytest.approx(steps_per_s * row["flops_per_step"])


def test_bench_writes_a_consistent_record(main, tmp_path):
    out = tmp_path / "bench.json"
    r = main("bench", "--device", "cpu", "--steps", "5", "--compile", "off", "--parts", "sweep,sequence,sequence-sweep",
             "--out", out)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["env"]["device"] == "cpu" and rec["env"]["torch"] and rec["machine"]["cpu_cores"] >= 1
    s = rec["sweep"]
    assert s["plain"]["students"] == 3 and s["batched_slice"]["students"] == 3 and s["batched_sweep"]["students"] == 12
    assert "compiled_sweep" not in s and "projection" not in rec
    for part in ("plain", "batched_slice", "batched_sweep"):
        _consistent(s[part], 256)
        assert s[part]["x_plain"] == pytest.approx(s[part]["samples_per_s"] / s["plain"]["samples_per_s"])
    assert s["projected"]["steps"] == 4000  # the quick preset's
    q = rec["sequence"]
    task, _ = _residual_lm(width=128, seq_len=128)
    assert q["flops_per_step"] == training_step_flops(16, 128, 128, 4, task.input.out_dim)
    assert q["timed_steps"] == 5 and q["matmul_peak"]["dtype"] == "float32" and q["matmul_peak"]["flops_per_s"] > 0
    assert q["fraction_of_matmul_peak"] == pytest.approx(q["achieved_flops_per_s"] / q["matmul_peak"]["flops_per_s"])
    assert s["matmul_peak"] == q["matmul_peak"]  # measured once in the run
    seq = rec["sequence_sweep"]
    assert seq["plain"]["students"] == 3 and seq["batched"]["students"] == 9
    assert seq["batched"]["tokens_per_s"] == pytest.approx(seq["batched"]["samples_per_s"] * 48)
    assert "× plain" in r.stdout and "tokens/s" in r.stdout and "GFLOP/s" in r.stdout


def test_training_flops_counts_the_shared_teacher_once_and_every_student():
    """Two students on one teacher: the teacher's forward (L layers of two matmuls) once, and each
    student's forward and backward (3× its forward matmuls; the first layer's input needs no gradient,
    and its readout is frozen: what torch actually runs is counted)."""
    from archbench.batched import Job
    from archbench.bench import training_flops
    from archbench.config import EvalSpec, resolve_config
    from archbench.registry import BLOCKS, TASKS
    from archbench.sweep import make_task, new_model
    from archbench.train import TrainConfig

    c = resolve_config(EvalSpec(block="residual-mlp", task="teacher-student", preset="smoke"))
    task = make_task(TASKS.get("teacher-student"), {**c.task, "teacher_depth": 4}, torch.device("cpu"))
    cfg = TrainConfig(**{**c.train, "batch_size": 8})
    jobs = [Job(new_model(BLOCKS.get("residual-mlp"), c, d, 0, task), task, cfg, 0, d, str(d)) for d in (1, 2)]
    d, v, b = 32, 128, 8
    layer = 2 * 2 * b * d * 4 * d  # fc1 and fc2, each 2·B·d·4d
    teacher = 4 * layer + 2 * b * d * v
    x, y = task.batch(b, torch.Generator().manual_seed(0))
    counter = flop_counter()
    with counter:
        task.loss(jobs[0].model(x), y).backward()
    one = counter.get_total_flops()
    assert training_flops(jobs[:1]) == teacher + one
    assert training_flops(jobs) - training_flops(jobs[:1]) == training_flops(jobs[1:]) - teacher
    assert training_flops(jobs[1:]) - teacher > one  # the deeper student costs more


def test_bench_projects_the_exp_9_3_sweep(monkeypatch):
    import archbench.bench as bench

    monkeypatch.setattr(bench, "PROJECTION", ("smoke", ("independent", "tied"), 1))  # the same code, small
    rec = bench.run_bench(bench.BenchSpec(device="cpu", steps=5, parts=("projection",), compile=False))
    p = rec["projection"]
    assert p["students"] == 6 and p["steps"] == 150  # 2 kinds × 1 teacher × the smoke preset's 3 depths
    assert p["projected_h"] == pytest.approx(p["steps"] * p["students"] * 256 / p["samples_per_s"] / 3600)
    assert 0 < p["fraction_of_matmul_peak"] and "eager batched engine" in p["what"]


def test_bench_bad_input_gets_one_line(main, tmp_path):
    r = main("bench", "--parts", "sweep,sequnce", "--out", tmp_path / "b.json")
    assert r.returncode == 2 and "sequence" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = main("bench", "--steps", "1", "--out", tmp_path / "b.json")
    assert r.returncode == 2 and "--steps 1" in r.stderr
    assert not (tmp_path / "b.json").exists()
