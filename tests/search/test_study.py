"""The study: end to end through the CLI, resume (a larger --trials continues it; cut-off and orphaned
trials are queued again), run records reused, a different configuration refused."""

import socket
import subprocess

import optuna

from archbench.search import SearchSpec, build_space, run_search
from archbench.search.space import only_buildable


def _blocks():
    """The blocks the smoke studies below draw from: those that can be built at depths 2 and 4."""
    return only_buildable(build_space("teacher-student", "smoke", {}, None), "teacher-student", "smoke", [2, 4], {})[0].blocks


def _counted(trials):
    return [t for t in trials if not (t.state.name == "FAIL" and "failure" not in t.user_attrs)]


def test_search_end_to_end_resume_and_reuse(main, tmp_path, tiny, load_study):
    runs = tmp_path / "runs"
    r = main("search", *tiny, "--trials", "2", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    assert "Pareto front" in r.stdout and "beat the residual baseline" in r.stdout
    assert "optuna-dashboard sqlite:///" in r.stdout and "reproduce trial" in r.stdout
    url = f"sqlite:///{runs.resolve() / 'studies.db'}"
    study = load_study(url, "teacher-student-alpha+loss-smoke")
    trials = study.get_trials()
    assert len(trials) == 2 and study.directions[0].name == "MAXIMIZE" and study.directions[1].name == "MINIMIZE"
    base = trials[0]
    assert base.user_attrs["baseline"] and base.params["block"] == "residual"
    assert base.user_attrs["budget"]["used"] == base.user_attrs["budget"]["limit"]  # the baseline sets the budget
    for t in trials:
        if t.state.name == "COMPLETE":
            assert len(t.values) == 2 and t.user_attrs["budget"]["used"] <= t.user_attrs["budget"]["limit"]
            assert all((runs / "records" / f"{k}.json").exists() for k in t.user_attrs["records"])
        else:
            assert t.state.name == "FAIL" and "loss became" in t.user_attrs["failure"]
    n_records = len(list((runs / "records").glob("*.json")))

    # the same command again: nothing to do; a larger --trials continues the same study
    r = main("search", *tiny, "--trials", "2", "--runs-dir", runs)
    assert r.returncode == 0 and len(load_study(url, "teacher-student-alpha+loss-smoke").get_trials()) == 2
    r = main("search", *tiny, "--trials", "3", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    trials = load_study(url, "teacher-student-alpha+loss-smoke").get_trials()
    assert len(trials) == 3 and [t.number for t in trials] == list(range(3))
    assert len(list((runs / "records").glob("*.json"))) <= n_records + 2  # one new trial at most, 2 depths

    # a different configuration under the same name is refused, and nothing is changed
    r = main("search", *tiny, "--trials", "4", "--budget", "none", "--runs-dir", runs)
    assert r.returncode == 2 and "different budget" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    assert len(load_study(url, "teacher-student-alpha+loss-smoke").get_trials()) == 3


def test_interrupted_trial_is_queued_again_and_records_reused(tmp_path, load_study):
    spec = SearchSpec(task="teacher-student", objectives=["alpha", "loss"], preset="smoke", depths=[2, 4],
                      sets={"train": {"steps": "30"}}, trials=1, runs_dir=str(tmp_path / "runs"), study="cut")
    run_search(spec)
    study = load_study(spec.storage_url, "cut")
    first = study.get_trials()[0]
    # a trial cut off mid-sweep (Ctrl-C, a killed worker): FAIL with no recorded reason
    study.enqueue_trial({"block": "rezero"})
    cut = study.ask()
    cut.suggest_categorical("block", _blocks())
    study.tell(cut, state=optuna.trial.TrialState.FAIL)
    cut_params = study.get_trials()[1].params
    # a trial left RUNNING by a process of this machine that was killed before its first heartbeat
    dead = subprocess.Popen(["true"])
    dead.wait()
    study.enqueue_trial({"block": "highway"})
    orphan = study.ask()
    orphan.suggest_categorical("block", _blocks())
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    run_search(SearchSpec(**{**spec.__dict__, "trials": 3}))
    trials = study.get_trials()
    assert len(_counted(trials)) == 3 and trials[orphan.number].state.name == "FAIL"
    for lost, block in ((cut.number, cut_params["block"]), (orphan.number, "highway")):
        retry = [t for t in trials if t.user_attrs.get("retry_of") == lost]
        assert len(retry) == 1 and retry[0].params["block"] == block and retry[0].state.name == "COMPLETE"
    assert first.user_attrs["baseline"] and first.state.name == "COMPLETE"


def test_pareto_front_and_hypervolume_figures(tmp_path):
    from archbench.search.figures import write_figures

    spec = SearchSpec(objectives=["compose", "lm-loss"], runs_dir=str(tmp_path), study="fig")
    study = optuna.create_study(directions=["minimize", "minimize"])
    assert write_figures(study, spec) == []  # nothing to draw before two trials are complete
    study.optimize(lambda t: (t.suggest_float("a", 0, 1), 1 - t.suggest_float("b", 0, 1) ** 2), n_trials=6)
    paths = write_figures(study, spec)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["pareto-front.png", "hypervolume.png"]
    assert all((tmp_path / "studies/fig" / p.rsplit("/", 1)[1]).stat().st_size > 1000 for p in paths)


def test_a_configuration_drawn_again_is_one_row_of_the_front():
    from archbench.search.results import summary

    study = optuna.create_study(directions=["minimize", "minimize"])
    dist = optuna.distributions.CategoricalDistribution(["residual", "rezero", "highway"])
    for block, values in [("residual", (0.4, 1.6)), ("rezero", (0.3, 1.4)), ("rezero", (0.3, 1.4)),
                          ("highway", (0.2, 1.9))]:
        study.add_trial(optuna.trial.create_trial(params={"block": block}, distributions={"block": dist},
                                                  values=list(values)))
    s = summary(study, SearchSpec(objectives=["compose", "lm-loss"], study="again"))
    assert [r["number"] for r in s["best"]] == [1, 3] and s["distinct"] == 3 and s["counted"] == 4
