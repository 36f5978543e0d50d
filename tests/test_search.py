"""`archbench search`: the space, the budget, objectives, storage, resume, failures, workers, PostgreSQL."""

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch

from archbench.errors import UsageError
from archbench.registry import BLOCKS
from archbench.search import (SearchSpec, build_space, fit_width, intermediate_value, measure, objective_value,
                              open_storage, sample)
from archbench.sweep import EvalSpec, make_task, resolve_config
from archbench.registry import TASKS

# every CLI search below: the smoke teacher, two depths, 30 steps: about a second a trial
TINY = ["--task", "teacher-student", "--preset", "smoke", "--depths", "2,4", "--set", "train.steps=30"]

FRAGILE = '''
import torch
import archbench

@archbench.register_block("fragile")
class Fragile(torch.nn.Module):
    """A block that raises on its first forward."""
    def __init__(self, dim, layer_idx, depth, *, scale: float = 1.0):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim)
    def forward(self, h):
        raise RuntimeError("fragile block refuses to run")
'''


def _study(storage_url, name):
    return optuna.load_study(study_name=name, storage=open_storage(storage_url, heartbeat=False))


def _counted(trials):
    return [t for t in trials if not (t.state.name == "FAIL" and "failure" not in t.user_attrs)]


# ------------------------------------------------------------------------------------------------ space


def test_default_space_is_conditional_and_skips_pinned_knobs():
    space = build_space("teacher-student", "quick", {"block": {"mlp_ratio": "2"}}, None)
    assert set(space.blocks) == set(BLOCKS.names())
    # the quick preset pins attention/act on vectors and --set pins mlp_ratio: none of them is searched
    assert all(k not in space.params["residual"] for k in ("attention", "act", "mlp_ratio"))
    assert space.params["looped"]["loop_layers"].high == 4  # from the block's declared Range
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        block, sets = sample(trial, space)
        seen.add(block)
        assert set(trial.params) == {"block"} | {f"{block}.{k}" for k in space.params[block]}
        assert set(sets["block"]) == set(space.params[block])
        study.tell(trial, 0.0)
    assert len(seen) >= 8  # families really vary


def test_space_file_narrows_pins_and_adds(tmp_path):
    f = tmp_path / "space.toml"
    f.write_text('blocks = ["residual-mlp", "looped"]\n[params]\n"looped.loop_layers" = {low = 1, high = 2}\n'
                 '"residual-mlp.mlp_ratio" = 2\n"train.lr" = {low = 1e-3, high = 1e-2, log = true}\n')
    space = build_space("teacher-student", "quick", {}, str(f))
    assert space.blocks == ["residual-mlp", "looped"]
    assert space.params["looped"]["loop_layers"].high == 2 and space.pinned["residual-mlp"] == {"mlp_ratio": 2}
    assert "mlp_ratio" not in space.params["residual-mlp"] and space.params["*"]["train.lr"].log
    study = optuna.create_study()
    study.enqueue_trial({"block": "residual-mlp"})
    block, sets = sample(study.ask(), space)
    assert sets["block"]["mlp_ratio"] == 2 and 1e-3 <= sets["train"]["lr"] <= 1e-2

    f.write_text('[params]\n"looped.loop_layer" = {low = 1, high = 2}\n')
    with pytest.raises(UsageError, match="looped.loop_layers"):  # a typo gets the close name
        build_space("teacher-student", "quick", {}, str(f))
    f.write_text('blocks = ["residul"]\n')
    with pytest.raises(UsageError, match="residual"):
        build_space("teacher-student", "quick", {}, str(f))
    f.write_text('[params]\n"looped.loop_layers" = {lo = 1}\n')
    with pytest.raises(UsageError, match="expected"):
        build_space("teacher-student", "quick", {}, str(f))


# ----------------------------------------------------------------------------------------------- budget


def _config(block, sets=None):
    return resolve_config(EvalSpec(block=block, task="teacher-student", preset="quick", sets=sets or {}))


def test_params_budget_gives_the_largest_width_under_the_baseline():
    ref = _config("residual")
    task = make_task(TASKS.get("teacher-student"), ref["task"], torch.device("cpu"))
    limit = measure("residual", ref, 16, task, 32, "params")
    # the baseline itself gets its own width back
    assert fit_width("residual", ref, 16, task, "params", limit, 256) == (32, limit)
    # a wider MLP must be narrower; one more step of width would exceed the budget
    wide = _config("residual", {"block": {"mlp_ratio": "8"}})
    width, used = fit_width("residual", wide, 16, task, "params", limit, 256)
    assert width < 32 and used <= limit
    assert measure("residual", wide, 16, task, width + 4, "params") > limit


def test_flops_budget_counts_every_application_of_a_shared_layer():
    ref = _config("residual")
    task = make_task(TASKS.get("teacher-student"), ref["task"], torch.device("cpu"))
    looped = _config("looped")
    # a looped block has the parameters of one layer but the FLOPs of all its applications
    assert measure("looped", looped, 16, task, 32, "params") < measure("residual", ref, 16, task, 32, "params") / 4
    flops_ref = measure("residual", ref, 16, task, 32, "flops")
    assert 0.5 < measure("looped", looped, 16, task, 32, "flops") / flops_ref < 2
    width, used = fit_width("looped", looped, 16, task, "flops", flops_ref, 256)
    assert used <= flops_ref and width in (28, 32)


# ------------------------------------------------------------------------------------------- objectives


def _run(depth, loss, later=None):
    metrics = {"skip-sensitivity": {"effect_on_later": later}} if later is not None else {}
    return {"depth": depth, "effective_depth": depth, "seed": 0, "status": "ok", "final_loss": loss,
            "metrics": metrics}


def test_objective_values_on_known_results():
    runs = [_run(4, 0.4), _run(8, 0.2, [0.2, 0.6, 0.0]), _run(8, 0.3, [0.1, 0.1, 0.2])]
    result = {"runs": runs, "metrics": {"alpha-ell": {"value": 1.3},
                                        "depth-to-solve": {"difficulties": [
                                            {"depth_to_solve": 2, "max_depth_tried": 8},
                                            {"depth_to_solve": None, "max_depth_tried": 8}]}}}
    assert objective_value("alpha", result) == 1.3
    assert objective_value("loss", result) == pytest.approx(0.25)  # mean over seeds at the largest depth
    assert objective_value("depth-to-solve", result) == 16  # hardest unsolved: twice the largest depth
    assert objective_value("redundancy", result) == pytest.approx(1 - 1.2 / 6)
    # the pruner's intermediate alpha on two depths of an exact power law is its exponent
    task = TASKS.get("teacher-student").obj
    power = [_run(d, 3.0 * d ** -1.7) for d in (2, 4)]
    assert intermediate_value("alpha", power[:1], task) is None
    assert intermediate_value("alpha", power, task) == pytest.approx(1.7, abs=1e-6)
    assert intermediate_value("loss", power, task) == pytest.approx(3.0 * 4 ** -1.7)


# ------------------------------------------------------------------------------------------ CLI and storage


def test_search_end_to_end_resume_and_reuse(cli, tmp_path):
    runs = tmp_path / "runs"
    r = cli("search", *TINY, "--trials", "3", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    assert "Pareto front" in r.stdout and "beat the residual baseline" in r.stdout
    assert "optuna-dashboard sqlite:///" in r.stdout and "reproduce trial" in r.stdout
    url = f"sqlite:///{runs.resolve() / 'studies.db'}"
    study = _study(url, "teacher-student-alpha+loss-smoke")
    trials = study.get_trials()
    assert len(trials) == 3 and study.directions[0].name == "MAXIMIZE" and study.directions[1].name == "MINIMIZE"
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
    r = cli("search", *TINY, "--trials", "3", "--runs-dir", runs)
    assert r.returncode == 0 and len(_study(url, "teacher-student-alpha+loss-smoke").get_trials()) == 3
    r = cli("search", *TINY, "--trials", "5", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    trials = _study(url, "teacher-student-alpha+loss-smoke").get_trials()
    assert len(trials) == 5 and [t.number for t in trials] == list(range(5))
    assert len(list((runs / "records").glob("*.json"))) <= n_records + 4  # two new trials at most, 2 depths each

    # a different configuration under the same name is refused, and nothing is changed
    r = cli("search", *TINY, "--trials", "6", "--budget", "none", "--runs-dir", runs)
    assert r.returncode == 2 and "different budget" in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    assert len(_study(url, "teacher-student-alpha+loss-smoke").get_trials()) == 5


def test_interrupted_trial_is_queued_again_and_records_reused(tmp_path):
    from archbench.search import run_search

    spec = SearchSpec(task="teacher-student", preset="smoke", depths=[2, 4], sets={"train": {"steps": "30"}},
                      trials=1, runs_dir=str(tmp_path / "runs"), study="cut")
    run_search(spec)
    study = _study(spec.storage_url, "cut")
    first = study.get_trials()[0]
    # a trial cut off mid-sweep (Ctrl-C, a killed worker): FAIL with no recorded reason
    study.enqueue_trial({"block": "rezero"})
    cut = study.ask()
    cut.suggest_categorical("block", build_space("teacher-student", "smoke", {}, None).blocks)
    study.tell(cut, state=optuna.trial.TrialState.FAIL)
    cut_params = study.get_trials()[1].params
    # a trial left RUNNING by a process of this machine that was killed before its first heartbeat
    dead = subprocess.Popen(["true"])
    dead.wait()
    study.enqueue_trial({"block": "highway"})
    orphan = study.ask()
    orphan.suggest_categorical("block", build_space("teacher-student", "smoke", {}, None).blocks)
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{dead.pid}")
    run_search(SearchSpec(**{**spec.__dict__, "trials": 3}))
    trials = study.get_trials()
    assert len(_counted(trials)) == 3 and trials[orphan.number].state.name == "FAIL"
    for lost, block in ((cut.number, cut_params["block"]), (orphan.number, "highway")):
        retry = [t for t in trials if t.user_attrs.get("retry_of") == lost]
        assert len(retry) == 1 and retry[0].params["block"] == block and retry[0].state.name == "COMPLETE"
    assert first.user_attrs["baseline"] and first.state.name == "COMPLETE"


def test_failures_are_data(cli, tmp_path):
    plugin = tmp_path / "fragile.py"
    plugin.write_text(FRAGILE)
    space = tmp_path / "space.toml"
    space.write_text('blocks = ["fragile", "residual-mlp"]\n')
    runs = tmp_path / "runs"
    # the fragile block is the baseline, so trial 0 draws it whatever the sampler does
    r = cli("search", *TINY, "--plugins", plugin, "--space", space, "--baseline", "fragile", "--trials", "4",
            "--study", "f", "--runs-dir", runs, "--seed", "3")
    assert r.returncode == 0, r.stderr
    trials = _study(f"sqlite:///{runs.resolve() / 'studies.db'}", "f").get_trials()
    assert len(trials) == 4
    for t in trials:
        if t.params["block"] == "fragile":
            assert t.state.name == "FAIL" and "fragile block refuses to run" in t.user_attrs["failure"]
        else:
            assert t.state.name == "COMPLETE"
    assert trials[0].params["block"] == "fragile" and trials[0].user_attrs["baseline"]
    assert "fragile block refuses to run" in r.stderr  # the trial's line says why
    # divergence is a failure with its reason too
    r = cli("search", *TINY, "--set", "train.optimizer=sgd", "--set", "train.lr=1e8", "--baseline", "residual-mlp",
            "--trials", "1", "--study", "d", "--space", space, "--plugins", plugin, "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    (t,) = _study(f"sqlite:///{runs.resolve() / 'studies.db'}", "d").get_trials()
    assert t.state.name == "FAIL" and "loss became" in t.user_attrs["failure"]


def test_single_objective_reports_intermediate_values(cli, tmp_path):
    runs = tmp_path / "runs"
    r = cli("search", *TINY, "--depths", "2,3,4", "--objective", "loss", "--trials", "2", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    assert "best trials" in r.stdout
    for t in _study(f"sqlite:///{runs.resolve() / 'studies.db'}", "teacher-student-loss-smoke").get_trials():
        if t.state.name == "COMPLETE":
            # one report per finished depth; the last is the objective itself
            assert sorted(t.intermediate_values) == [1, 2, 3]
            assert t.intermediate_values[3] == pytest.approx(t.values[0])
    # so its depths trained one after another (the pruner may stop a trial between them)
    records = [json.loads(p.read_text()) for p in (runs / "records").glob("*.json")]
    assert records and {r["engine"]["name"] for r in records} == {"plain"}


def test_bad_input_gets_one_line(cli, tmp_path):
    for args, needle in ((["--objective", "alpah"], "alpha"), (["--trials", "0"], "at least one"),
                         (["--storage", "mysql://x"], "expected sqlite"), (["--space", tmp_path / "none.toml"], "none.toml")):
        r = cli("search", *TINY, *args, "--runs-dir", tmp_path / "runs")
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def _check_workers(url, name, n, log):
    trials = _study(url, name).get_trials()
    assert len(trials) == n and sorted(t.number for t in trials) == list(range(n))
    assert all(t.state.name == "COMPLETE" for t in trials), [(t.number, t.state, t.user_attrs) for t in trials]
    started = Counter(int(line.split()[2]) for line in Path(log).read_text().splitlines())
    assert sorted(started) == list(range(n)) and set(started.values()) == {1}  # none lost, none run twice
    return {t.user_attrs["worker"] for t in trials}


def test_concurrent_workers_lose_and_repeat_no_trial(cli, tmp_path):
    runs = tmp_path / "runs"
    r = cli("search", *TINY, "--trials", "6", "--workers", "2", "--study", "w", "--runs-dir", runs, timeout=600)
    assert r.returncode == 0, r.stderr
    workers = _check_workers(f"sqlite:///{runs.resolve() / 'studies.db'}", "w", 6, runs / "studies/w/trials.log")
    assert len(workers) == 2  # both processes did work


# ---------------------------------------------------------------------------------------------- PostgreSQL


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server (Debian's ``postgresql``), started for these tests and stopped after."""
    pytest.importorskip("psycopg", reason="pip install 'archbench[postgres]'")
    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if not initdb:
        pytest.skip("PostgreSQL server binaries not installed (Debian package postgresql)")
    bindir = Path(os.path.realpath(initdb)).parent
    base = Path(tempfile.mkdtemp(prefix="archbench-pg-"))
    os.chmod(base, 0o755)
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    run = lambda *a: subprocess.run(as_user + [str(x) for x in a], capture_output=True, text=True, timeout=120)
    r = run(bindir / "initdb", "-D", base / "data", "-U", "archbench", "--auth=trust", "-E", "UTF8")
    if r.returncode:
        pytest.skip(f"initdb failed: {r.stderr.strip()[-300:]}")
    r = run(bindir / "pg_ctl", "-D", base / "data", "-l", base / "log", "-w", "-t", "60", "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start")
    if r.returncode:
        pytest.skip(f"PostgreSQL did not start: {r.stderr.strip()[-300:]}")
    try:
        assert run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "archbench", "search").returncode == 0
        yield f"postgresql://archbench@127.0.0.1:{port}/search"
    finally:
        run(bindir / "pg_ctl", "-D", base / "data", "-m", "fast", "stop")
        shutil.rmtree(base, ignore_errors=True)


def test_postgres_study_shared_by_two_invocations(cli, tmp_path, postgres_url):
    # two "machines": separate runs directories, one database
    a = cli("search", *TINY, "--trials", "4", "--workers", "2", "--study", "pg", "--storage", postgres_url,
            "--runs-dir", tmp_path / "a", timeout=600)
    assert a.returncode == 0, a.stderr
    b = cli("search", *TINY, "--trials", "6", "--study", "pg", "--storage", postgres_url,
            "--runs-dir", tmp_path / "b", timeout=600)
    assert b.returncode == 0, b.stderr
    logs = tmp_path / "log"
    logs.write_text((tmp_path / "a/studies/pg/trials.log").read_text() + (tmp_path / "b/studies/pg/trials.log").read_text())
    workers = _check_workers(postgres_url, "pg", 6, logs)
    assert len(workers) == 3
    assert "Pareto front (6 trials" in b.stdout


def test_docs_space_file_is_valid(tmp_path):
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "search.md").read_text()
    block = re.search(r"```toml\n# space.toml[^\n]*\n(.*?)```", doc, re.S).group(1)
    (tmp_path / "space.toml").write_text(block)
    space = build_space("teacher-student", "quick", {}, str(tmp_path / "space.toml"))
    assert space.blocks == ["residual", "rezero", "looped", "recurrent-depth"]
    assert space.pinned["residual"] == {"mlp_ratio": 4} and space.params["*"]["train.lr"].log
