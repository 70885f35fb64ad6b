"""common.lifecycle.ShutdownDeadline in a real child process: a hung shutdown step ends at the deadline."""
import subprocess
import sys
import textwrap
import time

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
