"""Confirmation: the front and the baseline re-run with several seeds at the preset's budget, each objective
compared with the baseline's by a paired bootstrap interval."""

import json
from pathlib import Path


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
