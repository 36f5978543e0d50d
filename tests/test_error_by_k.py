"""error-by-k on known records, and hop-induction end to end through the CLI."""

import json

import numpy as np
import pytest

from archbench.registry import EVALUATORS


def with_errors(make_run, depth, seed, errors):
    run = make_run(depth, 0.5, seed=seed)
    run.eval = {"loss": 0.5, **{f"error_k{k}": e for k, e in enumerate(errors)}}
    return run


def test_mean_interval_and_largest_k_solved_per_depth(make_run):
    ev = EVALUATORS.get("error-by-k").obj(solved_at=0.01)
    runs = [with_errors(make_run, 2, 0, [0.0, 0.005, 0.2, 0.7]), with_errors(make_run, 2, 1, [0.0, 0.015, 0.4, 0.7]),
            with_errors(make_run, 4, 0, [0.0, 0.0, 0.002, 0.3]), with_errors(make_run, 4, 1, [0.0, 0.0, 0.004, 0.5])]
    out = ev.evaluate_sweep(runs, None)
    assert out["k"] == [0, 1, 2, 3]
    d2, d4 = out["per_depth"]
    assert d2["depth"] == 2 and d2["seeds"] == 2 and d2["error"] == pytest.approx([0.0, 0.01, 0.3, 0.7])
    assert d2["largest_k_solved"] == 1  # mean error at k = 1 is exactly the threshold
    assert d4["largest_k_solved"] == 2
    half = 1.96 * np.std([0.2, 0.4], ddof=1) / np.sqrt(2)  # normal interval over the two seeds at k = 2
    assert d2["ci95"][0][2] == pytest.approx(0.3 - half) and d2["ci95"][1][2] == pytest.approx(0.3 + half)


def test_one_seed_has_no_interval_and_a_depth_that_fails_k0_solves_nothing(make_run):
    ev = EVALUATORS.get("error-by-k").obj()
    out = ev.evaluate_sweep([with_errors(make_run, 1, 0, [0.3, 0.6])], None)
    (row,) = out["per_depth"]
    assert row["ci95"] is None and row["largest_k_solved"] is None


def test_hop_induction_smoke_end_to_end(main, tmp_path):
    out = tmp_path / "hop.json"
    r = main("eval", "--block", "residual", "--task", "hop-induction", "--preset", "smoke", "--seeds", "2",
             "--runs-dir", tmp_path / "runs", "--out", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    for run in res["runs"]:
        assert run["status"] == "ok" and set(run["eval"]) >= {"loss", "accuracy", "error_k0", "error_k1", "error_k2"}
        assert all(0 <= run["eval"][f"error_k{k}"] <= 1 for k in range(3))
    table = res["metrics"]["error-by-k"]
    assert table["k"] == [0, 1, 2] and [row["depth"] for row in table["per_depth"]] == [1, 2]
    assert all(row["seeds"] == 2 and row["ci95"] is not None for row in table["per_depth"])
    assert out.with_suffix(".error-by-k.png").stat().st_size > 1000
    r = main("eval", "--task", "teacher-student", "--preset", "smoke", "--evaluators", "error-by-k",
             "--runs-dir", tmp_path / "runs")
    assert r.returncode != 0 and "does not score each hop count" in r.stderr and "Traceback" not in r.stderr
