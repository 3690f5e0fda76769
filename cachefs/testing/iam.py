"""A loopback IBM Cloud IAM token endpoint for tests: the API-key grant, short-lived tokens.

``IamServer(api_key, ttl)`` answers ``POST /identity/token`` with
``grant_type=urn:ibm:params:oauth:grant-type:apikey&apikey=KEY`` as IBM's endpoint does: a JSON
body with ``access_token``, ``expires_in`` (``ttl`` seconds) and ``expiration``; a wrong key gets
``400`` and IAM's error code ``BXNIM0415E``. Every token it issued is kept with its expiry, so
``authorize`` (a request head -> bool) can stand in front of a store: set it as a
``LatencyProxy``'s ``authorize`` and every request without a currently valid
``Authorization: Bearer`` token is refused (``403 AccessDenied``).

It runs in a thread of its own (``http.server``); use it as a context manager.
"""

from __future__ import annotations

import collections
import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"
_BEARER = re.compile(rb"\r\nauthorization:[ \t]*bearer[ \t]+([^\s]+)", re.IGNORECASE)


class IamServer:
    def __init__(self, api_key: str, ttl: float = 3600.0) -> None:
        self.api_key = api_key
        self.ttl = ttl
        #: every token issued, with the time.monotonic() it expires at
        self.issued: dict[str, float] = {}
        self.grants = 0  # successful exchanges
        self.refused_keys = 0  # exchanges with a wrong key
        self.used: collections.Counter[str] = collections.Counter()  # requests let through, per token
        self.denied: list[str] = []  # why ``authorize`` refused requests ("none", "expired", "unknown")
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name=f"iam-{self.port}")
        self._thread.start()

    @property
    def url(self) -> str:
        """The token endpoint, for ``IBM_AUTH_ENDPOINT``."""
        return f"http://127.0.0.1:{self.port}/identity/token"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> IamServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def issue(self) -> tuple[str, float]:
        token = "iam-" + secrets.token_hex(24)
        expires = time.monotonic() + self.ttl
        with self._lock:
            self.issued[token] = expires
            self.grants += 1
        return token, expires

    def revoke(self) -> None:
        """Revoke every token issued so far (the store refuses them from now on)."""
        with self._lock:
            self.issued.clear()

    def authorize(self, head: bytes) -> bool:
        """Whether a request (its head, as bytes) carries a token issued here that has not expired."""
        match = _BEARER.search(head)
        token = match.group(1).decode("latin-1") if match else None
        with self._lock:
            expires = self.issued.get(token) if token is not None else None
            if token is None or expires is None or time.monotonic() >= expires:
                self.denied.append("none" if token is None else "unknown" if expires is None else "expired")
                return False
            self.used[token] += 1
        return True

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        iam = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                if self.path.split("?")[0] != "/identity/token":
                    return self._answer(404, {"errorCode": "BXNIM0000E", "errorMessage": "Not found"})
                if form.get("grant_type") != [GRANT_TYPE]:
                    return self._answer(400, {"errorCode": "BXNIM0109E",
                                              "errorMessage": "Property 'grant_type' is invalid"})
                if form.get("apikey") != [iam.api_key]:
                    with iam._lock:
                        iam.refused_keys += 1
                    return self._answer(400, {"errorCode": "BXNIM0415E",
                                              "errorMessage": "Provided API key could not be found."})
                token, _ = iam.issue()
                ttl = int(iam.ttl) if iam.ttl == int(iam.ttl) else iam.ttl
                self._answer(200, {"access_token": token, "refresh_token": "not_supported",
                                   "token_type": "Bearer", "expires_in": ttl,
                                   "expiration": int(time.time() + iam.ttl), "scope": "ibm openid"})

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler
