"""Start, wait for and stop the bundled single-node Apache Kafka broker (KRaft).

The broker's jars are copied from Maven Central into deploy/kafka/lib by
`mvn -f deploy/kafka/pom.xml dependency:copy-dependencies` (scripts/setup.sh does it).
This module renders deploy/kafka/server.properties.template into a data dir, formats
the storage once, launches `java kafka.Kafka`, and waits until the broker answers a
metadata request (an open port is not enough: the controller may still be electing).

    python -m feedback.broker start --data-dir .run/kafka --port 19092
    python -m feedback.broker stop --data-dir .run/kafka
"""
from __future__ import annotations

import argparse
import base64
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KAFKA_DIR = REPO / "deploy" / "kafka"


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the local broker runs."""

    data_dir: Path = REPO / ".run" / "kafka"
    """Holds server.properties, the log dirs, broker.log and broker.pid."""
    port: int = 19092
    """PLAINTEXT listener on 127.0.0.1."""
    controller_port: int = 19093
    """KRaft controller listener on 127.0.0.1."""
    heap: str = "512m"
    """JVM -Xmx for the broker."""
    start_timeout_s: float = 90.0
    """How long to wait for the broker to answer metadata requests."""

    def __post_init__(self) -> None:
        for name in ("port", "controller_port"):
            v = getattr(self, name)
            if not 0 < v < 65536:
                raise ValueError(f"{name} must be a TCP port, got {v}")
        if self.port == self.controller_port:
            raise ValueError("port and controller_port must differ")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


def _lib_dir() -> Path:
    lib = KAFKA_DIR / "lib"
    if not any(lib.glob("kafka_2.13-*.jar")):
        raise FileNotFoundError(
            f"no Kafka jars in {lib}: run `mvn -q -f deploy/kafka/pom.xml dependency:copy-dependencies` "
            "(scripts/setup.sh does this)"
        )
    return lib


def _java_cmd(cfg: BrokerConfig, main: str, *args: str) -> list[str]:
    return [
        "java", f"-Xmx{cfg.heap}", "-Xms128m",
        f"-Dlog4j2.configurationFile={KAFKA_DIR / 'log4j2.properties'}",
        "-cp", str(_lib_dir() / "*"), main, *args,
    ]


def _render_properties(cfg: BrokerConfig) -> Path:
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    text = (KAFKA_DIR / "server.properties.template").read_text().format(
        port=cfg.port, controller_port=cfg.controller_port, data_dir=cfg.data_dir.resolve()
    )
    path = cfg.data_dir / "server.properties"
    path.write_text(text)
    return path


def new_cluster_id() -> str:
    """A random KRaft cluster id: a UUID in URL-safe base64 (22 characters), never starting with
    "-" (1 in 64 would, and the storage tool then reads it as an option; Kafka's own
    Uuid.randomUuid() redraws for the same reason)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def _format_storage(cfg: BrokerConfig, props: Path) -> None:
    """Formats the log dir once (KRaft needs a cluster id and a bootstrap metadata log)."""
    if (cfg.data_dir / "log" / "meta.properties").exists():
        return
    cluster_id = new_cluster_id()
    out = subprocess.run(
        _java_cmd(cfg, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props)),
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"kafka storage format failed:\n{out.stdout}\n{out.stderr}")


def _pid_file(cfg: BrokerConfig) -> Path:
    return cfg.data_dir / "broker.pid"


def read_pid(cfg: BrokerConfig) -> int | None:
    try:
        pid = int(_pid_file(cfg).read_text())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def broker_answers(bootstrap: str, timeout_s: float = 5.0) -> bool:
    """True if the broker answers a metadata request with itself as a live broker."""
    from kafka import KafkaAdminClient  # I/O edge: only imported when needed
    from kafka.errors import KafkaError, KafkaTimeoutError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    except (KafkaTimeoutError, OSError):
        return False
    try:
        return len(admin.describe_cluster().get("brokers", [])) > 0
    except (KafkaError, OSError, ValueError):
        return False
    finally:
        admin.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def start(cfg: BrokerConfig) -> int:
    """Starts the broker (if it is not already running) and waits until it answers. Returns its pid."""
    pid = read_pid(cfg)
    if pid is not None and broker_answers(cfg.bootstrap):
        return pid
    for port in (cfg.port, cfg.controller_port):
        if _port_open(port):
            raise RuntimeError(f"port {port} on 127.0.0.1 is taken by another process")
    props = _render_properties(cfg)
    _format_storage(cfg, props)
    log = open(cfg.data_dir / "broker.log", "ab")
    proc = subprocess.Popen(_java_cmd(cfg, "kafka.Kafka", str(props)), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(cfg).write_text(str(proc.pid))
    deadline = time.monotonic() + cfg.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"broker exited with {proc.returncode}; see {cfg.data_dir / 'broker.log'}")
        if _port_open(cfg.port) and broker_answers(cfg.bootstrap, timeout_s=2.0):
            return proc.pid
        time.sleep(0.5)
    stop(cfg)
    raise TimeoutError(f"broker did not answer within {cfg.start_timeout_s}s; see {cfg.data_dir / 'broker.log'}")


def stop(cfg: BrokerConfig, timeout_s: float = 30.0) -> None:
    """SIGTERM (a clean shutdown flushes logs), then SIGKILL if it lingers."""
    pid = read_pid(cfg)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        time.sleep(0.2)
    else:
        os.kill(pid, signal.SIGKILL)
    _pid_file(cfg).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m feedback.broker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--data-dir", type=Path, default=BrokerConfig.data_dir, help="broker state and logs")
    ap.add_argument("--port", type=int, default=BrokerConfig.port, help="PLAINTEXT port on 127.0.0.1")
    ap.add_argument("--controller-port", type=int, default=BrokerConfig.controller_port)
    a = ap.parse_args(argv)
    cfg = BrokerConfig(data_dir=a.data_dir, port=a.port, controller_port=a.controller_port)
    if a.action == "start":
        print(f"kafka broker up at {cfg.bootstrap} (pid {start(cfg)})")
    elif a.action == "stop":
        stop(cfg)
        print("kafka broker stopped")
    else:
        up = broker_answers(cfg.bootstrap)
        print(f"kafka broker at {cfg.bootstrap}: {'up' if up else 'down'} (pid {read_pid(cfg)})")
        return 0 if up else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
