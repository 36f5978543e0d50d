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


def test_compose_is_confirmed_beside_the_error_at_the_hardest_k(main, tmp_path):
    # two worker processes here; the other confirmation tests take the one-process path
    runs, space = tmp_path / "runs", tmp_path / "space.toml"
    space.write_text('blocks = ["residual", "highway"]\n')  # two blocks that build at depths 1, 2
    r = main("search", "--task", "hop-induction", "--objective", "compose", "--pruner", "none", "--preset", "smoke",
             "--set", "train.steps=20", "--space", space, "--trials", "2", "--confirm", "3", "--runs-dir", runs,
             "--workers", "2")
    assert r.returncode == 0, r.stderr
    study = runs / "studies/hop-induction-compose-smoke"
    logs = sorted(p.name for p in study.glob("confirm-*.log"))
    c = json.loads((study / "confirmation.json").read_text())
    (t,) = c["trials"]
    # the baseline's sweep, the trial's and its control's, each with its own log
    expected = ["confirm-0-hop-induction.log", f"confirm-{t['number']}-hop-induction.log"]
    if "control" in t:
        expected.append(f"confirm-{t['number']}-control-hop-induction.log")
    assert f"confirmation: {len(expected)} sweeps on 2 processes" in r.stderr, r.stderr
    assert logs == sorted(expected) and all("depth 2 seed 2:" in (study / name).read_text() for name in logs)
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


def test_a_trial_is_also_confirmed_against_the_baseline_block_with_its_settings(main, tmp_path):
    """The control: `residual` with the knobs the trial shares with it (here relu² and MLP ratio 2), its width
    fitted to the same parameter budget; the trial minus the control says what the block itself adds."""
    runs, space = tmp_path / "runs", tmp_path / "space.toml"
    # nothing sampled: every trial but the baseline is this one highway configuration
    space.write_text('blocks = ["residual", "highway"]\ndefaults = false\n[params]\n"highway.act" = "relu2"\n'
                     '"highway.mlp_ratio" = 2\n"highway.gate" = "scalar"\n')
    r = main("search", "--task", "hop-induction", "--objective", "compose", "--pruner", "none", "--preset", "smoke",
             "--set", "train.steps=20", "--depths", "2", "--space", space, "--trials", "3", "--confirm", "3",
             "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    study = runs / "studies/hop-induction-compose-smoke"
    (t,) = json.loads((study / "confirmation.json").read_text())["trials"]
    control = t["control"]
    assert t["block"] == "highway" and control["knobs"] == {"act": "relu2", "mlp_ratio": 2}  # not highway's gate
    c = json.loads((study / "confirmation.json").read_text())
    mine, ctl, base = (json.loads(Path(p).read_text()) for p in (
        t["results"]["hop-induction"], control["results"]["hop-induction"], c["baseline_results"]["hop-induction"]))
    cfg = ctl["config"]
    assert ctl["block"] == "residual" and cfg["block"]["act"] == "relu2" and cfg["block"]["mlp_ratio"] == 2
    assert cfg["train"]["steps"] == base["config"]["train"]["steps"] != 20  # the preset's full budget
    # sized to the baseline's parameters: a narrower MLP buys a wider model, still within the budget
    params = {name: max(run["params"] for run in res["runs"]) for name, res in (("ctl", ctl), ("base", base))}
    assert cfg["model"]["width"] > base["config"]["model"]["width"] and params["ctl"] <= params["base"]

    def compose(result_runs):
        return sum((run["eval"]["error_k1"] + run["eval"]["error_k2"]) / 2 for run in result_runs
                   if run["depth"] == 2) / 3

    assert control["objectives"]["compose"]["diff"] == pytest.approx(compose(mine["runs"]) - compose(ctl["runs"]))
    assert "its control" in control["objectives"]["compose"]["verdict"]
    assert not list(study.glob("confirm-*.log"))  # one process: the sweeps report to the terminal
    assert "against its control (the baseline block with act=relu2, mlp_ratio=2)" in r.stdout
    md = (study / "hop-induction-compose-smoke.md").read_text()
    assert "compose: trial − control [95 % CI]" in md and "against its control" in md
    table = json.loads((study / "hop-induction-compose-smoke.json").read_text())
    assert len(table["rows"][1]["control"]["records"]["hop-induction"]) == 3  # 3 seeds at depth 2


def test_a_sweep_two_trials_share_is_run_once(monkeypatch):
    """Two trials' controls can be one configuration: it is trained once and both get its result."""
    from types import SimpleNamespace

    import archbench.sweep
    from archbench.config import EvalSpec
    from archbench.search.confirm import _run_sweeps

    ran = []
    monkeypatch.setattr(archbench.sweep, "run_eval",
                        lambda ev, console=None: ran.append(ev.block) or {"files": {"result": f"{ev.block}.json"}})
    same = lambda: EvalSpec(block="residual", task="lm-char", preset="quick", sets={"block": {"act": "relu2"}})  # noqa: E731
    evals = [((0, "trial"), EvalSpec(block="residual", task="lm-char", preset="quick")), ((1, "control"), same()),
             ((2, "trial"), EvalSpec(block="highway", task="lm-char", preset="quick")), ((3, "control"), same())]
    assert _run_sweeps(SimpleNamespace(workers=1, ray=False), evals) == ["residual.json", "residual.json",
                                                                         "highway.json", "residual.json"]
    assert ran == ["residual", "residual", "highway"]  # the shared control once
