"""A netem-like TCP proxy for loopback: added latency and injected faults, in user space.

Placed between a client and an object-store server on 127.0.0.1 (there is no ``tc netem``
here). Every chunk read from one side is delivered to the other ``latency`` seconds later; chunks
are delayed independently (a pipeline, not a queue of sleeps), and bandwidth is not capped. So
``latency=0.010`` adds 20 ms to every round trip.

Faults are decided per HTTP request (a client chunk that starts with an HTTP method), at a rate
or for a period, and can be switched at run time by the test that owns the proxy:

- ``error``   answer 503 SlowDown (S3 XML; Azure clients see 503 ServerBusy) without forwarding
- ``reset``   reset both connections (RST)
- ``stall``   forward the request, then hold the response until the stall ends, then reset
- ``cut``     forward the request, deliver only the first part of the response, then reset
- ``outage``  every new connection and request is reset

``inject`` also takes a tuple of kinds (not ``outage``): each faulted request then gets one of
them at random, e.g. ``inject(("error", "reset", "cut"), rate=0.1)`` for a mix of transient faults.

Usage: ``python -m cachefs.testing.proxy --listen 127.0.0.1:9000 --target 127.0.0.1:8333
--latency-ms 10`` (one-way milliseconds: 10 = +20 ms per round trip).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

FAULT_KINDS = ("error", "reset", "stall", "cut", "outage")
_METHODS = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ", b"OPTIONS ", b"PATCH ")
CHUNK = 256 * 1024
CUT_AFTER = 600  # bytes of a response delivered before a "cut": past the headers, into the body
_SLOWDOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
             b"x-ms-error-code: ServerBusy\r\nContent-Length: %d\r\n\r\n%s")
_SLOWDOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class FaultPlan:
    kind: str | tuple[str, ...] | None = None  # one of FAULT_KINDS, a mix of them, or None
    rate: float = 1.0  # probability per request
    until: float = float("inf")  # monotonic time when the fault stops
    stall_seconds: float = 30.0

    def active(self) -> bool:
        return self.kind is not None and time.monotonic() < self.until


@dataclass
class Stats:
    connections: int = 0
    requests: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)


def _rst(sock: socket.socket) -> None:
    """Abort a connection with RST. SHUT_RD first wakes a thread blocked in recv() on it (a bare
    close() would leave the kernel socket alive until that recv returned, sending nothing)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class _Delayer:
    """Delivers (time, data) items to a socket in order once their time has come."""

    def __init__(self, dst: socket.socket, latency: float) -> None:
        self.dst = dst
        self.latency = latency
        self.items: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.cond = threading.Condition()
        self.limit: int | None = None  # bytes still allowed through (for "cut"), None = no limit
        self.hold_until = 0.0  # stall: deliver nothing before this
        self.closed = False
        threading.Thread(target=self._run, daemon=True).start()

    def put(self, data: bytes | None) -> None:
        with self.cond:
            self.items.append((time.monotonic() + self.latency, data))
            self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.items:
                    self.cond.wait()
                due, data = self.items[0]
            wait = max(due, self.hold_until) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
                continue
            with self.cond:
                self.items.popleft()
            if data is None:
                with contextlib.suppress(OSError):
                    self.dst.shutdown(socket.SHUT_WR)
                return
            try:
                if self.limit is not None:
                    data = data[: self.limit]
                    self.limit -= len(data)
                    if self.limit <= 0:
                        if data:
                            self.dst.sendall(data)
                        _rst(self.dst)
                        return
                self.dst.sendall(data)
            except OSError:
                return


class LatencyProxy:
    """One listening socket forwarding to ``target`` with latency and faults."""

    def __init__(self, target: tuple[str, int], latency: float = 0.0, listen: tuple[str, int] = ("127.0.0.1", 0),
                 seed: int | None = None) -> None:
        self.target = target
        self.latency = latency
        self.plan = FaultPlan()
        self.stats = Stats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._sock = socket.create_server(listen, backlog=1024)
        self.port: int = self._sock.getsockname()[1]
        self._stopped = False
        self._conns: set[socket.socket] = set()
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control ------------------------------------------------------------------------------

    def inject(self, kind: str | tuple[str, ...] | None, rate: float = 1.0, duration: float | None = None,
               stall_seconds: float = 30.0) -> None:
        """Start injecting ``kind`` faults (None stops; a tuple: each fault picks one of them), at
        ``rate`` per request, for ``duration`` seconds (default: until changed)."""
        kinds = (kind,) if isinstance(kind, str) else kind or ()
        if any(k not in FAULT_KINDS for k in kinds) or (len(kinds) > 1 and "outage" in kinds):
            raise ValueError(f"unknown fault {kind!r}; use one of {FAULT_KINDS} (or a mix without outage)")
        until = time.monotonic() + duration if duration is not None else float("inf")
        with self._lock:
            self.plan = FaultPlan(kind, rate, until, stall_seconds)

    def clear(self) -> None:
        self.inject(None)

    def _roll(self) -> str | None:
        with self._lock:
            plan = self.plan
            if not plan.active():
                return None
            if plan.kind == "outage" or self._rng.random() < plan.rate:
                kind = plan.kind if isinstance(plan.kind, str) else self._rng.choice(plan.kind or ("",))
                self.stats.faults[kind] += 1
                return kind
        return None

    def close(self) -> None:
        self._stopped = True
        with contextlib.suppress(OSError):
            self._sock.close()
        for c in list(self._conns):
            _rst(c)

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            self.stats.connections += 1
            with self._lock:
                outage = self.plan.active() and self.plan.kind == "outage"
            if outage:
                self.stats.faults["outage"] += 1
                _rst(client)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _rst(client)
            return
        upstream.settimeout(None)
        for s in (client, upstream):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conns.add(s)
        to_server = _Delayer(upstream, self.latency)
        to_client = _Delayer(client, self.latency)
        threading.Thread(target=self._pump_back, args=(upstream, to_client, client), daemon=True).start()
        try:
            while True:
                data = client.recv(CHUNK)
                if not data:
                    to_server.put(None)
                    return
                if data.startswith(_METHODS):
                    self.stats.requests += 1
                    fault = self._roll()
                    if fault == "error":
                        body = _SLOWDOWN_BODY
                        with contextlib.suppress(OSError):
                            client.sendall(_SLOWDOWN % (len(body), body))
                        time.sleep(0.01)
                        _rst(client)
                        _rst(upstream)
                        return
                    if fault in ("reset", "outage"):
                        _rst(client)
                        _rst(upstream)
                        return
                    if fault == "stall":
                        to_client.hold_until = time.monotonic() + self.plan.stall_seconds
                        to_client.limit = 0  # after the stall: reset without a byte
                    elif fault == "cut":
                        to_client.limit = CUT_AFTER
                to_server.put(data)
        except OSError:
            _rst(upstream)
        finally:
            self._conns.discard(client)

    def _pump_back(self, upstream: socket.socket, to_client: _Delayer, client: socket.socket) -> None:
        try:
            while True:
                data = upstream.recv(CHUNK)
                if not data:
                    to_client.put(None)
                    return
                to_client.put(data)
        except OSError:
            _rst(client)
        finally:
            self._conns.discard(upstream)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cachefs.testing.proxy", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--latency-ms", type=float, default=10.0,
                        help="one-way delay per chunk in ms (10 = +20 ms per round trip)")
    args = parser.parse_args()
    lhost, lport = args.listen.rsplit(":", 1)
    thost, tport = args.target.rsplit(":", 1)
    proxy = LatencyProxy((thost, int(tport)), args.latency_ms / 1000, (lhost, int(lport)))
    print(f"listening on {proxy.address} -> {args.target}, +{2 * args.latency_ms:g} ms per round trip", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        proxy.close()


if __name__ == "__main__":
    main()

