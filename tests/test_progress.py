"""Progress where no terminal is: timed plain lines (a log file, a cluster job), not silence."""

import io
import time

from rich.console import Console

from archbench.progress import Progress


def test_log_lines_say_what_runs_how_far_and_how_long_is_left():
    buf = io.StringIO()
    with Progress(Console(file=buf, force_terminal=False, width=200), every=0.0) as progress:
        assert not progress.live
        bar = progress.add("depth 4 seed 0", total=1000)
        time.sleep(0.01)
        progress.update(bar, completed=250, info="loss 0.123")
        progress.update(bar, advance=250)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("depth 4 seed 0: step 250/1,000, loss 0.123, ") and "left" in lines[0]
    assert lines[1].startswith("depth 4 seed 0: step 500/1,000, loss 0.123")


def test_lines_are_spaced_by_the_interval():
    buf = io.StringIO()
    with Progress(Console(file=buf, force_terminal=False), every=3600) as progress:
        bar = progress.add("sweep", total=3, unit="run")
        for _ in range(3):
            progress.update(bar, advance=1)
    assert buf.getvalue() == ""  # within the first interval: nothing yet


def test_eval_into_a_log_file_shows_progress(main, tmp_path):
    r = main("eval", "--preset", "smoke", "--depths", "1", "--set", "train.steps=20", "--evaluators", "alpha-ell",
            "--runs-dir", tmp_path / "runs", "--out", tmp_path / "r.json", env={"ARCHBENCH_PROGRESS_EVERY": "0"})
    assert r.returncode == 0, r.stderr
    assert any(line.startswith("depth 1 seed 0: step 20/20, loss ") for line in r.stderr.splitlines()), r.stderr
    assert any(line.startswith("sweep: run 1/1") for line in r.stderr.splitlines()), r.stderr
    bad = main("eval", "--preset", "smoke", "--depths", "1", "--runs-dir", tmp_path / "runs",
               env={"ARCHBENCH_PROGRESS_EVERY": "soon"})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "ARCHBENCH_PROGRESS_EVERY='soon'" in bad.stderr
