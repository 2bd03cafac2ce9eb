"""The HTTP server of a process's Prometheus /metrics page (transport layer): the coordinator's and
the workers' metrics serve their registries through it."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServer:
    """Serves one registry's /metrics over HTTP on its own port; :meth:`close` releases the port."""

    def __init__(self, registry: CollectorRegistry, *, what: str = "metrics") -> None:
        self.registry = registry
        self.what = what  # for error messages: "metrics", "worker metrics"
        self.port: int | None = None  # the port bound, once serving
        self._http: tuple[Any, threading.Thread] | None = None

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start serving; returns the port bound (useful with port 0).

        Raises ``OSError`` naming the address when it cannot listen there (e.g. the port is taken).
        """
        if self._http is not None:
            raise RuntimeError(f"the {self.what} are already served on port {self.port}")
        try:
            self._http = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            raise OSError(f"cannot serve {self.what} on {host}:{port}: {error.strerror or error}") from None
        self.port = int(self._http[0].server_address[1])
        return self.port

    def close(self) -> None:
        """Stop serving, if started, and release the port."""
        http, self._http = self._http, None
        self.port = None
        if http is not None:
            server, thread = http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
