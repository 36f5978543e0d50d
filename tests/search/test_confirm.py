"""Confirmation: the front and the baseline re-run with several seeds at the preset's budget, each objective
compared with the baseline's by a paired bootstrap interval."""

import json
from pathlib import Path

import pytest


def test_confirmation_reruns_the_front_at_full_budget_and_compares_with_intervals(main, tmp_path, tiny):
    runs = tmp_path / "runs"
    # one objective: the best trials are every completed one, so trial 1 is confirmed beside the baseline
    r = main("search", *tiny, "--objective", "loss", "--pruner", "none", "--trials", "2", "--confirm", "3",
             "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    c = json.loads((runs / "studies/teacher-student-loss-smoke/confirmation.json").read_text())
    assert c["seeds"] == 3 and c["baseline"] == 0 and c["trials"]
    for t in c["trials"]:
        for name, v in t["objectives"].items():
            lo, hi = v["ci95"]
            assert lo <= v["diff"] <= hi or abs(v["diff"] - (lo + hi) / 2) < abs(hi - lo)  # an interval around it
            covers = lo <= 0 <= hi
            assert covers == v["verdict"].startswith("not distinguishable"), (name, v)
        assert t["win"] == (any(v["verdict"].startswith("better") for v in t["objectives"].values())
                            and not any(v["verdict"].startswith("worse") for v in t["objectives"].values()))
        result = json.loads(Path(t["results"]["teacher-student"]).read_text())
        assert result["config"]["train"]["steps"] == 150  # the smoke preset's, not the search's 30
        assert sorted({run["seed"] for run in result["runs"]}) == [0, 1, 2]
    assert "beat the baseline (better on an objective beyond the noise, worse on none):" in r.stdout
    assert (runs / "studies/teacher-student-loss-smoke/history.png").stat().st_size > 1000 and "figures:" in r.stdout
    r = main("search", *tiny, "--objective", "loss", "--pruner", "none", "--trials", "2", "--confirm", "2",
             "--runs-dir", runs)
    assert r.returncode == 2 and "at least 3 seeds" in r.stderr and "Traceback" not in r.stderr
    table = json.loads((runs / "studies/teacher-student-loss-smoke/teacher-student-loss-smoke.json").read_text())
    assert table["n_trials"] == 2 and table["distinct_complete"] == 2 and table["confirmation"] == {"seeds": 3}
    assert [row["trial"] for row in table["rows"]][0] == 0 and table["rows"][0]["baseline"]
    for row in table["rows"]:  # every confirmed row names its runs: 3 seeds at each depth
        assert len(row["records"]["teacher-student"]) == 2 * 3  # depths 2, 4
        assert all((runs / "records" / f"{k}.json").exists() for k in row["records"]["teacher-student"])
    md = (runs / "studies/teacher-student-loss-smoke/teacher-student-loss-smoke.md").read_text()
    assert "2 trials" in md and "loss: trial − baseline [95 % CI]" in md and "archbench search" in md


@pytest.mark.parametrize("workers", [1, 2])
def test_compose_is_confirmed_beside_the_error_at_the_hardest_k(main, tmp_path, workers):
    runs, space = tmp_path / "runs", tmp_path / "space.toml"
    space.write_text('blocks = ["residual", "highway"]\n')  # two blocks that build at depths 1, 2
    r = main("search", "--task", "hop-induction", "--objective", "compose", "--pruner", "none", "--preset", "smoke",
             "--set", "train.steps=20", "--space", space, "--trials", "2", "--confirm", "3", "--runs-dir", runs,
             "--workers", str(workers))
    assert r.returncode == 0, r.stderr
    study = runs / "studies/hop-induction-compose-smoke"
    logs = sorted(p.name for p in study.glob("confirm-*.log"))
    if workers == 2:  # the baseline's sweep and the trial's, each in one of the two processes with its own log
        assert "confirmation: 2 sweeps on 2 processes" in r.stderr and len(logs) == 2, (r.stderr, logs)
        assert all("depth 2 seed 2:" in (study / name).read_text() for name in logs)  # each run's line
    else:
        assert logs == []
    c = json.loads((study / "confirmation.json").read_text())
    (t,) = c["trials"]
    compose, hardest = t["objectives"]["compose"], t["also"]["compose@error_k2"]  # smoke: k <= 2
    assert compose["metric"] == "error_over_k" and hardest["metric"] == "error_k2"
    mine, base = (json.loads(Path(p).read_text()) for p in (t["results"]["hop-induction"],
                                                            c["baseline_results"]["hop-induction"]))

    def at_depth_2(result, value):
        return sum(value(run["eval"]) for run in result["runs"] if run["depth"] == 2) / 3

    assert compose["diff"] == pytest.approx(at_depth_2(mine, lambda e: (e["error_k1"] + e["error_k2"]) / 2)
                                            - at_depth_2(base, lambda e: (e["error_k1"] + e["error_k2"]) / 2))
    assert hardest["diff"] == pytest.approx(at_depth_2(mine, lambda e: e["error_k2"])
                                            - at_depth_2(base, lambda e: e["error_k2"]))
    md = (runs / "studies/hop-induction-compose-smoke/hop-induction-compose-smoke.md").read_text()
    assert "error_k2: trial − baseline [95 % CI]" in md
