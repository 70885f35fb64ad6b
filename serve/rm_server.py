"""The reward-model gRPC server: rlhf.v1.RewardService.Score plus AdminService, health, reflection.

    python -m serve.rm_server --store models/store --kafka-bootstrap 127.0.0.1:19092 --port 50052

Serves the RM of the model store's newest verified version (the rm/ folder the trainer publishes)
and hot-swaps on the model-updates topic like the policy server: verify, load a standby copy,
canary (finite scores on fixed texts), then swap the reference between requests; a request
scores every item with the version it started with and the response names it.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

from common import auth
from common.config_cli import check_command_line, parse_config
from common.lifecycle import exit_now, startup_errors, stop_server
from common.metrics_http import serve_metrics
from common.model_store import CorruptCheckpoint, ModelStore
from common.omp import release_thread_pool
from protos.build import ensure_generated

from .config import RMServerConfig

if __name__ == "__main__":   # --help and a bad flag answered before torch is imported
    check_command_line(RMServerConfig, "python -m serve.rm_server", __doc__)

ensure_generated()
import grpc  # noqa: E402
import torch  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection  # noqa: E402
from prometheus_client import Counter, Histogram, Info  # noqa: E402

from rlhf.v1 import models_pb2 as mpb  # noqa: E402
from rlhf.v1 import models_pb2_grpc as mgrpc  # noqa: E402

from .reward_model import encode, load, rm_text  # noqa: E402
from .versions import Refused, ServedModel, UpdateWatcher, VersionManager, add_admin_service  # noqa: E402

log = logging.getLogger("serve.rm_server")

REQUESTS = Counter("rlhf_rm_requests_total", "Score calls by gRPC status", ["status"])
LATENCY = Histogram("rlhf_rm_request_latency_seconds", "Score call latency",
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
SCORES = Histogram("rlhf_rm_scores", "Normalised rewards returned", buckets=(-4, -2, -1, -0.5, 0, 0.5, 1, 2, 4))
ITEMS = Counter("rlhf_rm_scored_items_total", "(prompt, response) pairs scored")
MODEL = Info("rlhf_rm_model", "The reward-model version being served")
VERSION_EVENTS = Counter("rlhf_rm_version_events_total", "Hot-swap outcomes: swapped or refused", ["result"])


@dataclass
class LoadedRM:
    rm: object
    tok: object
    version: str


def load_rm(store, version: str, dtype: torch.dtype = torch.float32) -> LoadedRM:
    rm, tok = load(store.path(version) / "rm")
    return LoadedRM(rm.to(dtype), tok, version)


@torch.no_grad()
def score(m: LoadedRM, items: list[tuple[str, str, bool]], batch: int) -> list[float]:
    """(prompt, response, truncated) items -> normalised rewards, in order."""
    texts = [rm_text(p, r, t) for p, r, t in items]
    out = []
    for i in range(0, len(texts), batch):
        enc = encode(m.tok, texts[i:i + batch], m.rm.rcfg)
        out += m.rm.reward(**enc).float().tolist()
    return out


def rm_canary(cand: LoadedRM, current: LoadedRM) -> None:
    s = score(cand, [("Hello?", "Hi, how can I help you?", False), ("What is 2+2?", "4", False)], 8)
    if not all(map(lambda x: x == x and abs(x) < 1e6, s)):
        raise Refused(f"{cand.version}: non-finite or absurd scores on the canary pairs: {s}")


class RewardServicer(mgrpc.RewardServiceServicer):
    """Score calls arrive on many gRPC threads and run the model on one (`scoring`): a thread that runs
    torch keeps an OpenMP pool, and pools beyond the CPUs' count stop spinning and run every op slower
    (common/omp.py); the calls would compete for the same cores anyway."""

    def __init__(self, cfg: RMServerConfig, holder: dict):
        self.cfg, self.holder = cfg, holder
        self.scoring = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rm-score")

    def Score(self, request, context):
        t0, status = time.monotonic(), "OK"
        try:
            n = len(request.items)
            if n == 0 or n > self.cfg.max_items:
                status = "INVALID_ARGUMENT"
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"items: between 1 and {self.cfg.max_items}, got {n}")
            for i, it in enumerate(request.items):
                if len(it.prompt) > self.cfg.max_text_chars or len(it.response) > self.cfg.max_text_chars:
                    status = "INVALID_ARGUMENT"
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"items[{i}]: prompt and response must be <= {self.cfg.max_text_chars} characters")
            m = self.holder["current"]   # one version for the whole request
            fut = self.scoring.submit(score, m, [(it.prompt, it.response, it.truncated) for it in request.items],
                                      self.cfg.batch)
            context.add_callback(fut.cancel)   # a call cancelled or past its deadline leaves the queue
            s = fut.result()
            for x in s:
                SCORES.observe(x)
            ITEMS.inc(n)
            return mpb.ScoreResponse(scores=s, model_version=m.version)
        except futures.CancelledError:   # the call ended while it waited for the scoring thread
            status = "CANCELLED"
            raise
        except Exception:
            if status == "OK":
                status = "INTERNAL"
            raise
        finally:
            REQUESTS.labels(status).inc()
            LATENCY.observe(time.monotonic() - t0)


def serve(cfg: RMServerConfig):
    store = ModelStore(cfg.store)
    try:
        current = load_rm(store, store.newest_verified()[0], getattr(torch, cfg.dtype))
    except CorruptCheckpoint as e:
        raise SystemExit(str(e)) from e
    holder = {"current": current}

    def apply(new: ServedModel[LoadedRM]) -> None:
        holder["current"] = new.loaded   # a reference swap: requests in flight keep the object they read
        MODEL.info({"version": new.version})

    dtype = getattr(torch, cfg.dtype)
    mgr = VersionManager(store=store, load=lambda v: load_rm(store, v, dtype), canary=rm_canary, apply=apply,
                         current=ServedModel(current.version, current),
                         on_event=lambda result, v: VERSION_EVENTS.labels(result).inc(), part="rm")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="grpc"),
                         options=[("grpc.max_receive_message_length", 8 * 1024 * 1024), *auth.EXCLUSIVE_PORT],
                         interceptors=auth.interceptors(cfg.auth_tokens))
    mgrpc.add_RewardServiceServicer_to_server(RewardServicer(cfg, holder), server)
    add_admin_service(server, mgr)
    hs = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable_server_reflection(("rlhf.v1.RewardService", "rlhf.v1.AdminService", health.SERVICE_NAME,
                                         reflection.SERVICE_NAME), server)
    port = auth.bind(server, f"{cfg.host}:{cfg.port}", cfg.tls_cert, cfg.tls_key)
    if port == 0:
        raise OSError(f"could not bind {cfg.host}:{cfg.port}")
    server.start()
    hs.set("", health_pb2.HealthCheckResponse.SERVING)
    MODEL.info({"version": current.version})
    for result in ("swapped", "refused"):
        VERSION_EVENTS.labels(result)
    watcher = UpdateWatcher(cfg.kafka_bootstrap, mgr, "rm-server").start() if cfg.kafka_bootstrap else None
    release_thread_pool()   # this thread loaded the RM and now waits: scoring runs on its own (common/omp.py)
    return server, port, mgr, watcher


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(RMServerConfig, argv, prog="python -m serve.rm_server", description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not Path(cfg.store).is_dir():
        raise SystemExit(f"python -m serve.rm_server: error: --store {cfg.store}: no such folder")
    with startup_errors("python -m serve.rm_server"):   # a port in use, a token file that does not parse
        serve_metrics(cfg.metrics_port, cfg.host)
        server, port, mgr, watcher = serve(cfg)
    print(f"rm server listening on {cfg.host}:{port} model={mgr.current.version} metrics={cfg.metrics_port}",
          flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    if watcher:
        watcher.stop()
    stop_server(server, grace=5)
    exit_now(0)   # stopped in order above: skip the interpreter's teardown (see exit_now)


if __name__ == "__main__":
    main()
