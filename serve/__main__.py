"""python -m serve --model models/policy-v0 --port 50051: run the policy server (see --help)."""
from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from common.config_cli import check_command_line, parse_config

from .config import ServerConfig

PROG = "python -m serve"
if __name__ == "__main__":   # --help and a bad flag answered before torch and transformers are imported
    check_command_line(ServerConfig, PROG)

import torch  # noqa: E402
from safetensors import SafetensorError  # noqa: E402

from common import model_store  # noqa: E402
from common.lifecycle import exit_now, startup_errors, stop_server  # noqa: E402
from common.metrics_http import serve_metrics  # noqa: E402
from protos.build import ensure_generated  # noqa: E402

from .loader import load_policy  # noqa: E402
from .quantize import QuantizationUnsupported  # noqa: E402

ensure_generated()
from .server import serve  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ServerConfig, argv, prog=PROG)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    path = cfg.model
    if cfg.store:  # the newest version of the store that verifies
        if not Path(cfg.store).is_dir():
            raise SystemExit(f"{PROG}: error: --store {cfg.store}: no such folder")
        store = model_store.ModelStore(cfg.store)
        try:
            path = store.path(store.newest_verified()[0]) / "policy"
        except model_store.CorruptCheckpoint as e:
            raise SystemExit(str(e)) from e
    try:
        policy = load_policy(path, dtype=getattr(torch, cfg.dtype), device=cfg.device, cpu_pack=cfg.cpu_pack,
                             quantize_mode=cfg.quantize)
    except QuantizationUnsupported as e:
        raise SystemExit(str(e)) from e
    except (OSError, ValueError, SafetensorError) as e:   # a folder that is no servable checkpoint: one line
        raise SystemExit(f"{PROG}: error: cannot load the policy in {path}: {type(e).__name__}: {e}") from e
    with startup_errors(PROG):   # a port in use, a token file that does not parse
        serve_metrics(cfg.metrics_port, cfg.host)
        server, port, engine, interactions = serve(cfg, policy)
    # machine-readable line: tests and scripts wait for it
    print(f"policy server listening on {cfg.host}:{port} model={policy.version} metrics={cfg.metrics_port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    refused = engine.drain()   # queued requests: UNAVAILABLE now; the running batch finishes
    logging.info("shutting down: %d queued requests refused, finishing the running ones (grace 10s)", refused)
    stop_server(server, grace=10)
    try:
        if server.versions is not None and server.versions.watcher is not None:   # a StoreFollower, with --store
            server.versions.watcher.stop()
        engine.stop()
        if interactions is not None:  # deliver what is still buffered for the interactions topic
            interactions.close()
    except Exception:
        logging.exception("shutdown failed")
        exit_now(1)
    exit_now(0)   # stopped in order above: skip the interpreter's teardown (see exit_now)


if __name__ == "__main__":
    main()
