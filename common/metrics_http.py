"""The /metrics HTTP endpoint of a process; each service's metrics.py defines the series."""
from __future__ import annotations

from prometheus_client import start_http_server


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serves the default registry on host:port in a daemon thread; port 0 turns it off."""
    if port:
        start_http_server(port, addr=host)
