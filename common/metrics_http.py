"""The /metrics HTTP endpoint of a process; each service's metrics.py defines the series."""
from __future__ import annotations

from prometheus_client import start_http_server


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serves the default registry on host:port in a daemon thread; port 0 turns it off. OSError naming
    the metrics port when it cannot be bound."""
    if port:
        try:
            start_http_server(port, addr=host)
        except OSError as e:
            raise OSError(f"cannot serve /metrics on {host}:{port} (--metrics-port): {e.strerror or e}") from e
