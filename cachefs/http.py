"""The metrics and health HTTP server: ``/metrics``, ``/healthz``, ``/readyz``.

It runs in its own thread (wsgiref), so it keeps answering even when the trio loop is stuck;
that is exactly when ``/healthz`` must say 503. Health is a real request through the mount: a
lookup of a reserved name that the daemon answers with ENOENT without touching the bucket.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from .errors import UsageError

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 5.0  # a mount that cannot answer a lookup in 5 s is not healthy
HEALTH_NAME = ".cachefs-healthz"


def parse_addr(text: str) -> tuple[str, int]:
    """``[HOST:]PORT`` -> (host, port); the host defaults to 127.0.0.1."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = ""
    host = host.strip("[]") or "127.0.0.1"
    try:
        num = int(port)
    except ValueError:
        raise UsageError(f"--metrics-addr must be [HOST:]PORT, not {text!r}") from None
    if not 0 <= num <= 65535:
        raise UsageError(f"--metrics-addr port out of range: {num}")
    return host, num


class HealthProbe:
    """Stats a reserved name in the mount from one helper thread, never more than one at once."""

    def __init__(self, mountpoint: str) -> None:
        self.path = os.path.join(mountpoint, HEALTH_NAME)
        self._lock = threading.Lock()
        self._pending_since: float | None = None
        self._last_ok = 0.0

    def _probe(self) -> None:
        try:
            os.stat(self.path)
        except FileNotFoundError:
            ok = True
        except OSError as exc:
            ok = exc.errno == errno.ENOENT
        else:
            ok = True
        with self._lock:
            self._pending_since = None
            if ok:
                self._last_ok = time.monotonic()

    def healthy(self) -> bool:
        with self._lock:
            if self._pending_since is None:
                self._pending_since = time.monotonic()
                threading.Thread(target=self._probe, daemon=True, name="healthz").start()
        deadline = time.monotonic() + HEALTH_TIMEOUT
        while time.monotonic() < deadline:
            with self._lock:
                if self._pending_since is None:
                    return time.monotonic() - self._last_ok < HEALTH_TIMEOUT
            time.sleep(0.005)
        return False


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def start(addr: str, health: Callable[[], bool], ready: Callable[[], bool]) -> _Server:
    """Serve in a background thread; returns the server (call ``shutdown()`` to stop)."""
    host, port = parse_addr(addr)
    metrics_app = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok = health() if path == "/healthz" else ready()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [b"ok\n" if ok else b"unavailable\n"]
        if path in ("/metrics", "/"):
            return metrics_app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} for metrics: {exc.strerror}") from None
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http").start()
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server
