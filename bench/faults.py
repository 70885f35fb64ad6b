"""A broker crash under steady feedback (sim/broker_fault.py), against the real service.

    python bench/faults.py            (--quick: shorter phases)

Starts the bundled Kafka broker on a temporary data dir and `python -m feedback.service` on it,
sends SubmitComparison calls every 50 ms, kills the broker with SIGKILL, restarts it on the same
data dir, and goes on until the service answers OK again. Goal: 0 false OK, 0 duplicates,
recovery within 15 s of the broker being back, without restarting the service.
Last line: one JSON object (acked, stored, false_ok, duplicates, seconds_to_recover, codes, ...).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from common.net import free_port  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s phases and 3 s down instead of 5 s and 10 s")
    a = ap.parse_args()
    from protos.build import ensure_generated
    ensure_generated()
    from feedback.broker import BrokerConfig, start, stop
    from feedback.topics import ensure_topics
    from sim import broker_fault
    with tempfile.TemporaryDirectory() as d:
        cfg = BrokerConfig(data_dir=Path(d) / "kafka", port=free_port(), controller_port=free_port())
        start(cfg)
        ensure_topics(cfg.bootstrap)
        port = free_port()
        svc = subprocess.Popen([sys.executable, "-m", "feedback.service", "--bootstrap", cfg.bootstrap, "--port",
                                str(port), "--metrics-port", "0", "--kafka-timeout-s", "2"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log_tail: list[str] = []   # the service's last lines; its log is read all along (a full pipe blocks it)
        try:
            for line in svc.stdout:
                if re.search(r"feedback service listening", line):
                    break

            def drain() -> None:
                for ln in svc.stdout:
                    log_tail[:] = (log_tail + [ln])[-200:]
            threading.Thread(target=drain, daemon=True).start()
            t0 = time.monotonic()
            res = broker_fault.run(cfg, f"127.0.0.1:{port}", steady_s=2 if a.quick else 5,
                                   down_s=3 if a.quick else 10, after_s=2 if a.quick else 5)
            res["seconds"] = round(time.monotonic() - t0, 1)
        finally:
            svc.terminate()
            svc.wait(timeout=30)
            stop(cfg)
    res.update(bench="faults", quick=a.quick, service_exit_code=svc.returncode)
    if svc.returncode:
        print("".join(log_tail[-40:]), file=sys.stderr)
    print(f"acked {res['acked']}, false OK {res['false_ok']}, duplicates {res['duplicates']}, recovered "
          f"{res['seconds_to_recover']} s after the broker came back", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
