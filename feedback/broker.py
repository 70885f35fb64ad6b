"""Start, wait for and stop the bundled Apache Kafka broker (KRaft): one node by default, or a
replicated cluster of N nodes on this machine.

The broker's jars are copied from Maven Central into deploy/kafka/lib by
`mvn -f deploy/kafka/pom.xml dependency:copy-dependencies` (scripts/setup.sh does it).
This module renders deploy/kafka/server.properties.template for each node, formats each node's
storage once with the cluster's one id, launches `java kafka.Kafka` per node, and waits until every
node is a live broker in the cluster's metadata (an open port is not enough: the controller quorum
may still be electing).

Every node is broker and controller in one process ("combined" mode) and every node is a voter of a
static controller quorum (`controller.quorum.voters`, Kafka 4.1 operations guide, "KRaft"): with 3
nodes the cluster survives the loss of any one. One node keeps its files directly in --data-dir;
node k of a cluster in --data-dir/node-k, each with its own ports and node id k.

    python -m feedback.broker start --data-dir .run/kafka --port 19092
    python -m feedback.broker start --brokers 3 --data-dir .run/kafka3 --port 29092   (ports 29092/29094/29096)
    python -m feedback.broker stop --data-dir .run/kafka
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from common.net import free_port

from .topics import replication_for

REPO = Path(__file__).resolve().parent.parent
KAFKA_DIR = REPO / "deploy" / "kafka"


@dataclass(frozen=True)
class Node:
    """One KRaft server of the cluster: a broker and a controller voter in one process."""

    node_id: int
    port: int
    controller_port: int
    data_dir: Path


@dataclass(frozen=True)
class BrokerConfig:
    """Where and how the local broker (or cluster of brokers) runs."""

    data_dir: Path = REPO / ".run" / "kafka"
    """Holds server.properties, the log dirs, broker.log and broker.pid (a cluster: one node-k folder per node)."""
    port: int = 19092
    """PLAINTEXT listener of node 1 on 127.0.0.1."""
    controller_port: int = 19093
    """KRaft controller listener of node 1 on 127.0.0.1."""
    brokers: int = 1
    """Nodes in the cluster. Topics get min(3, brokers) replicas, and 2 in-sync replicas with 3 or more."""
    node_ports: tuple[tuple[int, int], ...] = ()
    """(PLAINTEXT, controller) ports of every node, node 1 first (it must be (port, controller_port));
    (): node k gets port + 2(k-1) and controller_port + 2(k-1)."""
    heap: str = "512m"
    """JVM -Xmx for each node."""
    start_timeout_s: float = 90.0
    """How long to wait for every node to answer metadata requests as a live broker."""

    def __post_init__(self) -> None:
        if self.brokers < 1:
            raise ValueError(f"brokers must be >= 1, got {self.brokers}")
        if self.node_ports and len(self.node_ports) != self.brokers:
            raise ValueError(f"node_ports names {len(self.node_ports)} nodes, brokers is {self.brokers}")
        if self.node_ports and tuple(self.node_ports[0]) != (self.port, self.controller_port):
            raise ValueError("node_ports[0] must be (port, controller_port)")
        ports = [p for n in self.nodes() for p in (n.port, n.controller_port)]
        for p in ports:
            if not 0 < p < 65536:
                raise ValueError(f"ports must be TCP ports, got {p}")
        if len(set(ports)) != len(ports):
            raise ValueError(f"every node's port and controller_port must differ from all others: {ports}")

    @classmethod
    def on_free_ports(cls, data_dir: Path, brokers: int = 1, **kw) -> "BrokerConfig":
        """A config whose nodes listen on ports free now (tests, benches, the main job)."""
        ports: list[int] = []
        while len(ports) < 2 * brokers:   # distinct: the OS may hand out a just-released port again
            if (p := free_port()) not in ports:
                ports.append(p)
        pairs = tuple(zip(ports[::2], ports[1::2]))
        return cls(data_dir=data_dir, port=pairs[0][0], controller_port=pairs[0][1], brokers=brokers,
                   node_ports=pairs, **kw)

    def nodes(self) -> list[Node]:
        pairs = self.node_ports or [(self.port + 2 * k, self.controller_port + 2 * k) for k in range(self.brokers)]
        if self.brokers == 1:   # the single node keeps the layout it always had
            return [Node(1, pairs[0][0], pairs[0][1], self.data_dir)]
        return [Node(k + 1, p, c, self.data_dir / f"node-{k + 1}") for k, (p, c) in enumerate(pairs)]

    def node(self, node_id: int) -> Node:
        return self.nodes()[node_id - 1]

    @property
    def bootstrap(self) -> str:
        """Every node, comma separated: a client reaches the cluster through any one that is up."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes())


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


def _render_properties(cfg: BrokerConfig, node: Node) -> Path:
    node.data_dir.mkdir(parents=True, exist_ok=True)
    rf, min_isr = replication_for(cfg.brokers)
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in cfg.nodes())
    text = (KAFKA_DIR / "server.properties.template").read_text().format(
        node_id=node.node_id, voters=voters, port=node.port, controller_port=node.controller_port,
        log_dir=node.data_dir.resolve() / "log", replication=rf, min_isr=min_isr)
    path = node.data_dir / "server.properties"
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


def _cluster_id(cfg: BrokerConfig) -> str:
    """The cluster's id, drawn once and kept in data_dir/cluster.id: every node is formatted with it."""
    path = cfg.data_dir / "cluster.id"
    if not path.exists():
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(new_cluster_id())
    return path.read_text().strip()


def _format_storage(cfg: BrokerConfig, node: Node, props: Path) -> None:
    """Formats a node's log dir once (KRaft needs the cluster id and a bootstrap metadata log)."""
    if (node.data_dir / "log" / "meta.properties").exists():
        return
    out = subprocess.run(
        _java_cmd(cfg, "kafka.tools.StorageTool", "format", "-t", _cluster_id(cfg), "-c", str(props)),
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"kafka storage format of node {node.node_id} failed:\n{out.stdout}\n{out.stderr}")


def _pid_file(node: Node) -> Path:
    return node.data_dir / "broker.pid"


def _gone(pid: int) -> bool:
    """True if the process has exited (reaped here if it is our child: a killed child stays a zombie)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:   # reap it if it is our child
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _runs_node(pid: int, node: Node) -> bool:
    """Whether process `pid` is this node's Kafka: its command line runs kafka.Kafka on the node's
    properties file (a relative path read against the process's own working directory). A pid
    file outlives its broker (a reboot, kill -9 of the main job) and its pid may since be another
    process's, which stop must not signal. Without /proc (not Linux) the pid file is trusted."""
    proc = Path("/proc") / str(pid)
    if not Path("/proc/self").exists():
        return True
    try:
        args = [os.fsdecode(a) for a in (proc / "cmdline").read_bytes().split(b"\0")]
        cwd = Path(os.readlink(proc / "cwd"))
    except OSError:   # gone meanwhile, or another user's process: not ours
        return False
    want = (node.data_dir / "server.properties").resolve()
    return "kafka.Kafka" in args and any(a.endswith("server.properties") and (cwd / a).resolve() == want
                                         for a in args)


def read_pid(cfg: BrokerConfig, node_id: int = 1) -> int | None:
    """The pid of a node's running process (None if it is not running)."""
    node = cfg.node(node_id)
    try:
        pid = int(_pid_file(node).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return None if _gone(pid) or not _runs_node(pid, node) else pid


def live_brokers(bootstrap: str, timeout_s: float = 5.0) -> set[int]:
    """Ids of the live (registered, not fenced) brokers in the cluster's metadata, asked of any node
    in `bootstrap` (empty if none answers)."""
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000),
                                 bootstrap_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, OSError):   # NoBrokersAvailable, a timeout: nobody answers
        return set()
    try:
        return {b["broker_id"] for b in admin.describe_cluster().get("brokers", []) if not b.get("is_fenced")}
    except (KafkaError, OSError, ValueError):
        return set()
    finally:
        admin.close()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _launch(cfg: BrokerConfig, node: Node) -> subprocess.Popen:
    for port in (node.port, node.controller_port):
        if _port_open(port):
            raise RuntimeError(f"port {port} on 127.0.0.1 is taken by another process")
    props = _render_properties(cfg, node)
    _format_storage(cfg, node, props)
    log = open(node.data_dir / "broker.log", "ab")
    proc = subprocess.Popen(_java_cmd(cfg, "kafka.Kafka", str(props)), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(node).write_text(str(proc.pid))
    return proc


def start(cfg: BrokerConfig) -> int:
    """Starts every node that is not running (all before waiting: a quorum needs a majority to elect)
    and waits until every node is a live broker. Restarting one killed node of a running cluster is
    the same call. Returns node 1's pid."""
    wanted = {n.node_id for n in cfg.nodes()}
    if all(read_pid(cfg, k) for k in wanted) and live_brokers(cfg.bootstrap) == wanted:
        return read_pid(cfg, 1)
    launched = {}
    try:
        for n in cfg.nodes():
            if read_pid(cfg, n.node_id) is None:
                launched[n.node_id] = _launch(cfg, n)
    except BaseException:   # a node that could not even launch (no java, a full disk): none left half-started
        _stop_launched(cfg, launched)
        raise
    deadline = time.monotonic() + cfg.start_timeout_s
    while time.monotonic() < deadline:
        for k, proc in launched.items():
            if proc.poll() is not None:
                _stop_launched(cfg, launched)
                raise RuntimeError(f"kafka node {k} exited with {proc.returncode}; "
                                   f"see {cfg.node(k).data_dir / 'broker.log'}")
        if any(_port_open(n.port) for n in cfg.nodes()) and live_brokers(cfg.bootstrap, timeout_s=2.0) == wanted:
            return read_pid(cfg, 1)
        time.sleep(0.5)
    _stop_launched(cfg, launched)   # only what this call started: the running nodes stay up
    raise TimeoutError(f"kafka did not have all {cfg.brokers} brokers live within {cfg.start_timeout_s}s; "
                       f"see broker.log under {cfg.data_dir}")


def _stop_launched(cfg: BrokerConfig, launched: dict[int, subprocess.Popen], timeout_s: float = 30.0) -> None:
    """Stops the nodes start() launched, through their Popen handles: a node launched a moment ago may
    not have exec'd Java yet, and read_pid would not take it for the broker (see _runs_node)."""
    for proc in launched.values():
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    deadline = time.monotonic() + timeout_s
    for proc in launched.values():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for k in launched:
        _pid_file(cfg.node(k)).unlink(missing_ok=True)


def stop(cfg: BrokerConfig, timeout_s: float = 30.0, node_ids: set[int] | None = None) -> int:
    """SIGTERM to every node (or the given ones) at once, since a clean shutdown flushes logs; then
    SIGKILL to any that lingers (a node whose quorum has already gone cannot finish a controlled shutdown).
    Returns how many nodes were running."""
    nodes = [n for n in cfg.nodes() if node_ids is None or n.node_id in node_ids]
    pids = {}
    for n in nodes:
        pid = read_pid(cfg, n.node_id)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            pids[n.node_id] = pid
    running = len(pids)
    deadline = time.monotonic() + timeout_s
    while pids and time.monotonic() < deadline:
        pids = {k: p for k, p in pids.items() if not _gone(p)}
        time.sleep(0.2)
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):   # it may have exited just now
            os.kill(pid, signal.SIGKILL)
        _gone(pid)
    for n in nodes:
        _pid_file(n).unlink(missing_ok=True)
    return running


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m feedback.broker", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--data-dir", type=Path, default=BrokerConfig.data_dir, help="broker state and logs")
    ap.add_argument("--port", type=int, default=BrokerConfig.port, help="PLAINTEXT port of node 1 on 127.0.0.1")
    ap.add_argument("--controller-port", type=int, default=BrokerConfig.controller_port,
                    help="controller port of node 1 (node k: this + 2(k-1))")
    ap.add_argument("--brokers", type=int, default=None,
                    help="nodes in the cluster (node k: --port + 2(k-1), data in <data-dir>/node-k); "
                         "default 1 for start, the node-k folders in --data-dir for stop and status")
    ap.add_argument("--heap", default=BrokerConfig.heap, help="JVM -Xmx of each node")
    a = ap.parse_args(argv)
    brokers = a.brokers if a.brokers is not None else (
        1 if a.action == "start" else max(1, len(list(a.data_dir.glob("node-*")))))
    try:
        cfg = BrokerConfig(data_dir=a.data_dir, port=a.port, controller_port=a.controller_port, brokers=brokers,
                           heap=a.heap)
    except ValueError as e:
        ap.error(str(e))
    if a.action != "start" and not a.data_dir.is_dir():
        ap.error(f"--data-dir {a.data_dir}: no such folder (no broker was started with it)")
    if a.action == "start":
        start(cfg)
        pids = ", ".join(f"node {n.node_id}: pid {read_pid(cfg, n.node_id)}" for n in cfg.nodes())
        print(f"kafka up at {cfg.bootstrap} ({pids})")
    elif a.action == "stop":
        running = stop(cfg)
        print(f"kafka stopped ({running} node(s) were running)" if running else
              f"no kafka node of {a.data_dir} was running: nothing to stop")
    else:
        live = live_brokers(cfg.bootstrap)
        for n in cfg.nodes():
            print(f"node {n.node_id} at 127.0.0.1:{n.port}: {'up' if n.node_id in live else 'down'} "
                  f"(pid {read_pid(cfg, n.node_id)})")
        return 0 if len(live) == cfg.brokers else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
