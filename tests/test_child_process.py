"""common/child_process.py, the one process runner of the main job, the tests and the benches."""
from __future__ import annotations

import signal

import pytest

from common.child_process import ChildProcess

WORKER = "tests.workers.child_lines"


def test_waits_for_the_ready_line_logs_the_output_and_stops_with_sigterm(tmp_path):
    child = ChildProcess(WORKER, ["serve"], tmp_path / "serve.log")
    try:
        assert child.wait_for(r"ready on port (\d+)", 60).group(1) == "1234"
    finally:
        child.stop()
    assert child.proc.returncode == -signal.SIGTERM
    assert (tmp_path / "serve.log").read_text() == child.output() == "starting\nready on port 1234\n"


def test_a_child_that_exits_before_it_is_ready_is_an_error_naming_its_code_and_output(tmp_path):
    child = ChildProcess(WORKER, ["exit"], tmp_path / "exit.log", name="quitter")
    with pytest.raises(RuntimeError, match=r"(?s)quitter exited \(3\) before it was ready.*failing on purpose"):
        child.wait_for(r"ready on port", 60)


def test_a_child_deaf_to_sigterm_is_killed_after_the_timeout(tmp_path):
    child = ChildProcess(WORKER, ["deaf"], tmp_path / "deaf.log")
    child.wait_for(r"ready on port", 60)   # SIGTERM is ignored from here on
    child.stop(timeout=1)
    assert child.proc.returncode == -signal.SIGKILL


def test_only_the_last_lines_stay_in_memory_and_the_log_has_them_all(tmp_path):
    child = ChildProcess(WORKER, ["chatty"], tmp_path / "chatty.log", keep_lines=10)
    child.proc.wait(timeout=60)
    child.stop()
    assert child.output() == "".join(f"line {i}\n" for i in range(20, 30))
    assert (tmp_path / "chatty.log").read_text() == "starting\n" + "".join(f"line {i}\n" for i in range(30))
