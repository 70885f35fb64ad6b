"""common.lifecycle.ShutdownDeadline in a real child process: a hung shutdown step ends at the deadline;
startup_errors."""
import subprocess
import sys
import textwrap
import time

import pytest

HUNG = textwrap.dedent("""
    import logging, threading, time
    from common.lifecycle import ShutdownDeadline
    logging.basicConfig(level=logging.INFO)
    threading.Thread(target=time.sleep, args=(60,)).start()   # a non-daemon thread the interpreter would wait for
    d = ShutdownDeadline({seconds}, code=3)
    d.step("closing the producer")
    {then}
""")


def run_child(seconds: float, then: str) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", HUNG.format(seconds=seconds, then=then)], capture_output=True,
                       text=True, timeout=60)
    return p.returncode, p.stderr, time.monotonic() - t0


def test_a_hung_step_ends_the_process_at_the_deadline_naming_the_step():
    code, err, took = run_child(1.0, "time.sleep(60)")
    assert code == 3, err
    assert "shutdown still at step 'closing the producer' after 1s; exiting now" in err
    assert took < 20, took   # not the 60 s of the hung step or of the thread


def test_done_cancels_the_deadline():
    code, err, took = run_child(1.0, "d.done(); time.sleep(2.5); print('still here'); import os; os._exit(0)")
    assert code == 0 and "exiting now" not in err, err


def test_startup_errors_become_one_line_and_other_errors_keep_their_traceback():
    from common.lifecycle import startup_errors

    class BrokerDown(Exception):
        pass
    with pytest.raises(SystemExit, match=r"^prog: error: cannot listen on 127.0.0.1:1$"):
        with startup_errors("prog"):
            raise OSError("cannot listen on 127.0.0.1:1")
    with pytest.raises(SystemExit, match=r"^prog: error: BrokerDown: no broker$"):
        with startup_errors("prog", also=(BrokerDown,)):
            raise BrokerDown("no broker")
    with pytest.raises(KeyError):   # not a start-up error a user can fix: a bug, with its traceback
        with startup_errors("prog"):
            raise KeyError("x")
