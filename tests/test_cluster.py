"""Sweeps and search workers on a real Ray cluster: one head node started here with `ray start --head`
(skipped only where Ray is not installed or the cluster cannot start)."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (archbench[ray])")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    """The address of a one-node Ray cluster (2 CPUs), stopped after the module's tests."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("Ray is not installed (archbench[ray])")
    scratch = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # Ray's socket paths must stay short
    port = _free_port()
    log = open(Path(scratch) / "head.log", "w")
    head = subprocess.Popen([Path(sys.executable).with_name("ray"), "start", "--head", "--block", "--port", str(port),
                             "--num-cpus", "2", "--object-store-memory", str(100 * 2**20), "--include-dashboard",
                             "false", "--disable-usage-stats", "--temp-dir", scratch],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    probe = f"import ray; ray.init(address={address!r}, logging_level='ERROR'); ray.shutdown()"
    deadline = time.time() + 120
    while subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode != 0:
        if head.poll() is not None or time.time() > deadline:
            _stop(head)
            pytest.skip("a local Ray cluster could not start: " + (Path(scratch) / "head.log").read_text()[-500:])
        time.sleep(2)
    yield address
    _stop(head)


def _stop(head):
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
            head.wait(wait)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


SMOKE = ["eval", "--block", "residual", "--task", "hop-induction", "--preset", "smoke"]


def _records(runs_dir: Path) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (runs_dir / "records").glob("*.json")}


def test_eval_on_ray_writes_the_records_a_local_sweep_writes_and_resumes(ray_head, tmp_path, cli):
    remote = cli(*SMOKE, "--runs-dir", tmp_path / "remote", "--ray", ray_head,
                     env={"ARCHBENCH_PROGRESS_EVERY": "0"})
    assert remote.returncode == 0, remote.stderr[-2000:]
    assert "2 runs on the Ray cluster" in remote.stderr
    local = cli(*SMOKE, "--runs-dir", tmp_path / "local", "--engine", "plain")
    assert local.returncode == 0, local.stderr[-2000:]
    mine, theirs = _records(tmp_path / "remote"), _records(tmp_path / "local")
    assert set(mine) == set(theirs) and len(mine) == 2  # the same runs, by the same keys
    for key, record in mine.items():
        assert record["final_loss"] == pytest.approx(theirs[key]["final_loss"], rel=1e-3)  # thread counts differ
        assert record["metrics"].keys() == theirs[key]["metrics"].keys()  # measured on the node too
        assert (tmp_path / "remote" / "records" / f"{key}.pt").stat().st_size > 0  # the weights came back
    again = cli(*SMOKE, "--runs-dir", tmp_path / "remote", "--ray", ray_head,
                    "--out", tmp_path / "again.json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(r["cached"] for r in json.loads((tmp_path / "again.json").read_text())["runs"])


def test_search_workers_run_as_ray_tasks(ray_head, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "archbench", "search", "--task", "teacher-student", "--preset", "smoke",
                             "--trials", "3",
                             "--workers", "2", "--objective", "loss", "--pruner", "none", "--ray", ray_head,
                             "--runs-dir", tmp_path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="teacher-student-loss-smoke", storage=f"sqlite:///{tmp_path}/studies.db")
    assert len(study.trials) == 3 and all(t.state.is_finished() for t in study.trials)
    pids = {t.user_attrs["worker"].split(":")[1] for t in study.trials}
    assert str(proc.pid) not in pids  # trained in the cluster's worker processes, not the command's
    assert sorted(p.name for p in (tmp_path / "studies" / "teacher-student-loss-smoke").glob("worker-*.log")) == \
        ["worker-0.log", "worker-1.log"]


@needs_ray
def test_an_address_nothing_answers_at_is_one_line(tmp_path, cli):
    port = _free_port()
    r = cli(*SMOKE, "--runs-dir", tmp_path, "--ray", f"127.0.0.1:{port}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(f"archbench: error: --ray 127.0.0.1:{port}: nothing answers")
    assert not list((tmp_path / "records").glob("*.json"))
