"""A child for tests/test_child_process.py, run as `python -m tests.workers.child_lines MODE`:
"exit" prints a line and exits with code 3; "serve" prints a ready line and sleeps; "deaf" does
the same but ignores SIGTERM (so only SIGKILL stops it); "chatty" prints 30 numbered lines and exits."""
from __future__ import annotations

import signal
import sys
import time

mode = sys.argv[1]
print("starting", flush=True)
if mode == "exit":
    print("failing on purpose", flush=True)
    sys.exit(3)
if mode == "chatty":
    for i in range(30):
        print(f"line {i}", flush=True)
    sys.exit(0)
if mode == "deaf":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready on port 1234", flush=True)
time.sleep(600)
