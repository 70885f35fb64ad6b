"""python -m web --policy HOST:PORT --feedback HOST:PORT: the chat and labeling pages (see --help)."""
from __future__ import annotations

import logging
import socket

from common.config_cli import parse_config
from common.lifecycle import startup_errors
from protos.build import ensure_generated


def main(argv: list[str] | None = None) -> None:
    ensure_generated()   # before the app's imports: they use the generated rlhf.v1 modules
    import uvicorn

    from .app import Gateway
    from .config import WebConfig
    cfg = parse_config(WebConfig, argv, prog="python -m web")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # bound here, not by uvicorn, so that --port 0 can print the port it got
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with startup_errors("python -m web"):
        try:
            sock.bind((cfg.host, cfg.port))
        except OSError as e:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from e
        sock.listen(128)
    port = sock.getsockname()[1]
    scheme = "https" if cfg.tls_cert else "http"

    def ready() -> None:   # machine-readable line: tests and the main job wait for it
        print(f"web gateway listening on {scheme}://{cfg.host}:{port} policy={cfg.policy} feedback={cfg.feedback} "
              f"auth={'on' if cfg.auth_tokens else 'off'}", flush=True)

    with startup_errors("python -m web"):   # a token file that does not parse
        app = Gateway(cfg, on_ready=ready).app()
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", ssl_certfile=cfg.tls_cert or None,
                                           ssl_keyfile=cfg.tls_key or None, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])   # SIGINT/SIGTERM: stop accepting, give open streams 5 s, exit


if __name__ == "__main__":
    main()
