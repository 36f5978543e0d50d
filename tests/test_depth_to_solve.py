"""depth-to-solve on known sweeps, the task-grid sweep end to end, and every task at the smoke preset."""

import json

import pytest
import torch

from archbench.registry import EVALUATORS, TASKS
from archbench.config import EvalSpec
from archbench.sweep import make_task, run_eval


@pytest.fixture
def run(make_run):
    def make(vary, depth, solved, seed=0):
        return make_run(depth, 0.1 if solved else 1.0, seed=seed, solved=solved, vary=vary)
    return make


def test_smallest_solving_depth_per_difficulty_and_layers_per_step(run):
    ev = EVALUATORS.get("depth-to-solve").obj()
    runs = []
    need = {1: 1, 2: 3, 4: 5, 8: None}  # the depth from which each k is solved
    for k, first in need.items():
        for d in (1, 2, 3, 5, 8):
            runs.append(run({"task.k": k}, d, first is not None and d >= first))
    out = ev.evaluate_sweep(runs, None)
    assert [r["depth_to_solve"] for r in out["difficulties"]] == [1, 3, 5, None]
    assert [r["label"] for r in out["difficulties"]] == ["k=1", "k=2", "k=4", "k=8"]
    assert out["difficulty_knob"] == "task.k"
    assert out["layers_per_step"] == pytest.approx(9 / 7)  # least squares through (1, 1), (2, 3), (4, 5)
    assert out["difficulties"][3]["max_depth_tried"] == 8


def test_two_knobs_give_depth_against_the_numeric_one_per_value_of_the_other(run, tmp_path):
    """Merrill et al.'s figure: depth to solve against length, one line per group."""
    ev = EVALUATORS.get("depth-to-solve").obj()
    need = {("A5", 4): 2, ("A5", 8): 4, ("A5", 16): None, ("A4xZ5", 4): 1, ("A4xZ5", 8): 2, ("A4xZ5", 16): 2}
    runs = [run({"task.group": g, "task.seq_len": n}, d, first is not None and d >= first)
            for (g, n), first in need.items() for d in (1, 2, 4, 8)]
    out = ev.evaluate_sweep(runs, None)
    assert out["difficulty_knob"] == "task.seq_len" and out["series_knob"] == "task.group"
    assert [r["depth_to_solve"] for r in out["difficulties"]] == list(need.values())
    assert out["layers_per_step_by_series"]["A5"] == pytest.approx(0.5)  # (4, 2) and (8, 4)
    assert out["layers_per_step_by_series"]["A4xZ5"] == pytest.approx(1 / 14)  # least squares through (4, 1), (8, 2), (16, 2)
    assert "layers_per_step" not in out
    assert ev.plot(out, runs, tmp_path / "d.png") and (tmp_path / "d.png").stat().st_size > 1000
    # a second seed that needs twice the depth on A5 at length 4 and never solves length 8: bars over the seeds
    runs += [run({"task.group": g, "task.seq_len": n}, d, d >= {("A5", 4): 4}.get((g, n), first or 99), seed=1)
             for (g, n), first in need.items() if (g, n) != ("A5", 8) for d in (1, 2, 4, 8)]
    runs += [run({"task.group": "A5", "task.seq_len": 8}, d, False, seed=1) for d in (1, 2, 4, 8)]
    runs.sort(key=lambda r: list(need).index((r.vary["task.group"], r.vary["task.seq_len"])))
    rows = ev.evaluate_sweep(runs, None)["difficulties"]
    assert rows[0]["depth_to_solve_by_seed"] == {"0": 2, "1": 4} and rows[0]["depth_to_solve"] == 2
    assert rows[1]["depth_to_solve_by_seed"] == {"0": 4, "1": None} and rows[1]["depth_to_solve"] == 4
    assert ev.plot(ev.evaluate_sweep(runs, None), runs, tmp_path / "e.png")


def test_seed_fraction_and_non_monotone_depths(run):
    ev = EVALUATORS.get("depth-to-solve").obj(min_fraction=1.0)
    runs = [run({}, 2, True, 0), run({}, 2, False, 1), run({}, 4, True, 0), run({}, 4, True, 1),
            run({}, 6, False, 0), run({}, 6, False, 1)]
    (row,) = ev.evaluate_sweep(runs, None)["difficulties"]
    assert row["depth_to_solve"] == 4 and row["unsolved_above"] == [6]
    assert [p["solved_fraction"] for p in row["per_depth"]] == [0.5, 1.0, 0.0]
    assert row["depth_to_solve_by_seed"] == {"0": 2, "1": 4}  # each seed's own first solving depth
    assert EVALUATORS.get("depth-to-solve").obj(min_fraction=0.5).evaluate_sweep(runs, None)["difficulties"][0][
        "depth_to_solve"] == 2


@pytest.mark.parametrize("task", ["k-hop", "hop-induction", "word-problem", "variable-binding", "modular-chain",
                                  "cfg-language", "lm-word"])
def test_every_new_task_runs_the_smoke_preset_with_residual(task, tmp_path):
    res = run_eval(EvalSpec(block="residual", task=task, preset="smoke", runs_dir=str(tmp_path)))
    assert res["runs"] and all(r["status"] == "ok" for r in res["runs"])
    again = run_eval(EvalSpec(block="residual", task=task, preset="smoke", runs_dir=str(tmp_path)))
    assert all(r["cached"] for r in again["runs"])  # every record reads back (per-position lists included)
    assert not (tmp_path / "records" / "corrupt").exists()
    assert set(res["metrics"]) == set(TASKS.get(task).obj.default_evaluators)
    judged = TASKS.get(task).obj.solve_metric is not None
    assert all(isinstance(r["solved"], bool) == judged for r in res["runs"])
    headline = make_task(TASKS.get(task), res["config"]["task"], torch.device("cpu")).headline_metric()
    if headline is not None:  # a misspelt name would leave the leaderboard's column empty
        assert all(isinstance(r["eval"][headline], float) for r in res["runs"])
    if task == "cfg-language":
        ev = res["runs"][0]["eval"]
        assert ev["excess_ce"] == pytest.approx(ev["loss"] - ev["optimal_ce"]) and ev["entropy_rate"] > 0


def test_grid_over_a_task_knob_end_to_end_then_cached(main, tmp_path):
    out = tmp_path / "r.json"
    args = ("eval", "--block", "residual", "--task", "k-hop", "--preset", "smoke", "--set", "task.k=1,2",
            "--depths", "1", "--runs-dir", tmp_path / "runs", "--out", out)
    r = main(*args)
    assert r.returncode == 0, r.stderr
    assert "depth to solve (k=1)" in r.stdout and "depth to solve (k=2)" in r.stdout
    res = json.loads(out.read_text())
    assert [run["vary"] for run in res["runs"]] == [{"task.k": 1}, {"task.k": 2}]
    assert res["config"]["grid"] == {"task.k": [1, 2]}
    assert [d["label"] for d in res["metrics"]["depth-to-solve"]["difficulties"]] == ["k=1", "k=2"]
    assert out.with_suffix(".depth-to-solve.png").exists()
    again = main(*args, "--evaluators", "depth-to-solve,alpha-ell")
    assert again.returncode == 0, again.stderr
    res = json.loads(out.read_text())
    assert all(run["cached"] for run in res["runs"])
    # alpha_ell is fitted per grid point (here one depth each: not fitted, with the reason)
    assert [v["vary"] for v in res["metrics"]["alpha-ell"]["points"]] == [{"task.k": 1}, {"task.k": 2}]
    assert "alpha_ell (k=1): not fitted" in again.stdout


def test_bad_sweeps_and_evaluators_get_one_line(main, tmp_path):
    r = main("eval", "--preset", "smoke", "--evaluators", "depth-to-solve", "--runs-dir", tmp_path)
    assert r.returncode == 2 and "task 'teacher-student' has no notion of solved" in r.stderr
    r = main("eval", "--preset", "smoke", "--set", "alpha-ell.floor=0,1", "--runs-dir", tmp_path)
    assert r.returncode == 2 and "one value expected here, not a sweep" in r.stderr
    r = main("eval", "--task", "k-hop", "--preset", "smoke", "--set", "task.k=1,x", "--runs-dir", tmp_path)
    assert r.returncode == 2 and "task.k='x' is not a valid int" in r.stderr
    assert "Traceback" not in r.stderr
