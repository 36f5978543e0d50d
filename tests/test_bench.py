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


def test_bench_writes_a_consistent_record(main, tmp_path):
    out = tmp_path / "bench.json"
    r = main("bench", "--device", "cpu", "--steps", "5", "--out", out)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["env"]["device"] == "cpu" and rec["env"]["torch"] and rec["machine"]["cpu_cores"] >= 1
    s = rec["sweep"]
    assert s["plain"]["students"] == 3 and s["batched_slice"]["students"] == 3 and s["batched_sweep"]["students"] == 12
    for part in ("plain", "batched_slice", "batched_sweep"):
        assert s[part]["samples_per_s"] > 0 and s[part]["peak_rss_gib_so_far"] > 0
    assert s["speedup"] == pytest.approx(s["batched_sweep"]["samples_per_s"] / s["plain"]["samples_per_s"])
    assert s["projected"]["steps"] == 4000  # the quick preset's
    q = rec["sequence"]
    task, _ = _residual_lm(width=128, seq_len=128)
    assert q["flops_per_step"] == training_step_flops(16, 128, 128, 4, task.input.out_dim)
    assert q["timed_steps"] == 5 and q["matmul_peak"]["dtype"] == "float32" and q["matmul_peak"]["flops_per_s"] > 0
    assert q["fraction_of_matmul_peak"] == pytest.approx(q["achieved_flops_per_s"] / q["matmul_peak"]["flops_per_s"])
    assert "× plain" in r.stdout and "tokens/s" in r.stdout and "GFLOP/s" in r.stdout


def test_bench_bad_input_gets_one_line(main, tmp_path):
    r = main("bench", "--parts", "sweep,sequnce", "--out", tmp_path / "b.json")
    assert r.returncode == 2 and "sequence" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = main("bench", "--steps", "1", "--out", tmp_path / "b.json")
    assert r.returncode == 2 and "--steps 1" in r.stderr
    assert not (tmp_path / "b.json").exists()
