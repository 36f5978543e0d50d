"""Running a search: bad input refused in one line, K worker processes that lose and repeat no trial,
and two invocations sharing one study through a real PostgreSQL server."""

import glob
import multiprocessing
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import pytest


def test_bad_input_gets_one_line(main, tmp_path, tiny):
    for args, needle in ((["--objective", "alpah"], "alpha"), (["--trials", "0"], "at least one"),
                         (["--storage", "mysql://x"], "expected sqlite"), (["--space", tmp_path / "none.toml"], "none.toml")):
        r = main("search", *tiny, *args, "--runs-dir", tmp_path / "runs")
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def _check_workers(load_study, url, name, n, log):
    trials = load_study(url, name).get_trials()
    assert len(trials) == n and sorted(t.number for t in trials) == list(range(n))
    # every trial finished: with a result, or failed with its reason (sampled knobs may make a model that cannot
    # be built or trained); none left running
    assert all(t.state.name == "COMPLETE" or (t.state.name == "FAIL" and t.user_attrs.get("failure"))
               for t in trials), [(t.number, t.state, t.user_attrs) for t in trials]
    assert any(t.state.name == "COMPLETE" for t in trials)
    started = Counter(int(line.split()[2]) for line in Path(log).read_text().splitlines())
    assert sorted(started) == list(range(n)) and set(started.values()) == {1}  # none lost, none run twice
    return {t.user_attrs["worker"] for t in trials}


def test_workers_take_trials_from_one_count_so_none_idles():
    """This machine's workers share the remaining count: exactly that many trials in all, and a worker whose
    trials end early takes those another would have had (a fixed split left a core idle at a study's end)."""
    from archbench.search.workers import _taker

    left = multiprocessing.get_context("spawn").Value("i", 5)
    fast, slow = _taker(left), _taker(left)
    assert slow()  # the slow worker takes one trial and trains it...
    assert [fast() for _ in range(6)] == [True] * 4 + [False] * 2  # ...while the fast one takes all the rest
    assert not slow() and left.value == 0
    own = _taker(2)  # a single worker in the command's own process counts for itself
    assert [own() for _ in range(3)] == [True, True, False]


def test_concurrent_workers_lose_and_repeat_no_trial(main, tmp_path, tiny, load_study):
    runs = tmp_path / "runs"
    r = main("search", *tiny, "--trials", "4", "--workers", "2", "--study", "w", "--runs-dir", runs)
    assert r.returncode == 0, r.stderr
    workers = _check_workers(load_study, f"sqlite:///{runs.resolve() / 'studies.db'}", "w", 4,
                             runs / "studies/w/trials.log")
    # both processes started; which of them trained how many trials depends on who came up first
    assert sorted(p.name for p in (runs / "studies/w").glob("worker-*.log")) == ["worker-0.log", "worker-1.log"]
    assert 1 <= len(workers) <= 2


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


def test_postgres_study_shared_by_two_invocations(main, tmp_path, postgres_url, tiny, load_study):
    # two "machines": separate runs directories, one database
    a = main("search", *tiny, "--trials", "2", "--workers", "2", "--study", "pg", "--storage", postgres_url,
            "--runs-dir", tmp_path / "a")
    assert a.returncode == 0, a.stderr
    b = main("search", *tiny, "--trials", "3", "--study", "pg", "--storage", postgres_url,
            "--runs-dir", tmp_path / "b")
    assert b.returncode == 0, b.stderr
    logs = tmp_path / "log"
    a_log, b_log = ((tmp_path / m / "studies/pg/trials.log").read_text() for m in "ab")
    logs.write_text(a_log + b_log)
    _check_workers(load_study, postgres_url, "pg", 3, logs)
    # the second invocation found the first's two trials in the database and ran only the third
    assert [int(line.split()[2]) for line in b_log.splitlines()] == [2]
    by_trial = {t.number: t.user_attrs["worker"] for t in load_study(postgres_url, "pg").get_trials()}
    assert by_trial[2] not in (by_trial[0], by_trial[1])
    assert "Pareto front (3 trials" in b.stdout


def test_queued_trials_are_each_taken_once(tmp_path):
    # Optuna takes a queued trial by reading WAITING, then writing RUNNING; on SQLite, without a lock taken
    # before the read, two workers could take the same one (how the baseline once ran twice)
    import threading

    import optuna

    from archbench.search.study import open_storage

    url = f"sqlite:///{tmp_path / 'q.db'}"
    optuna.create_study(storage=open_storage(url, heartbeat=False), study_name="q")
    for _ in range(3):
        optuna.load_study(study_name="q", storage=open_storage(url, heartbeat=False)).enqueue_trial({"x": 1.0})
    studies = [optuna.load_study(study_name="q", storage=open_storage(url, heartbeat=False)) for _ in range(6)]
    start, taken = threading.Barrier(len(studies)), []

    def ask(study):
        start.wait()
        taken.append(study.ask().number)

    threads = [threading.Thread(target=ask, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == list(range(6))  # three queued trials and three new ones, none handed out twice
