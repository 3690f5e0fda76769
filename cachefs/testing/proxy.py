"""A netem-like TCP proxy for loopback: added latency and injected faults, in user space.

Placed between a client and an object-store server on 127.0.0.1 (``tc netem`` needs root and
a real interface). Every chunk read from one side is delivered to the other ``latency`` seconds
later. Chunks are delayed independently (a pipeline, not a queue of sleeps: a stream keeps its
bandwidth, only its round trips get longer) and bandwidth is not capped; ``latency`` is one way,
so ``latency=0.010`` adds 20 ms to every round trip. A new connection's first bytes wait one
round trip more, as behind a TCP handshake.

Faults are decided per HTTP request (request heads are parsed; bodies are skipped by their
Content-Length), at a ``rate`` per request, for the next ``count`` requests and/or for a
``duration``, switched at run time by the test that owns the proxy (``inject``, ``clear``):

- ``error``     answer ``503 SlowDown`` (Azure: ``ServerBusy``) instead of forwarding the request
- ``error500``  answer ``500 InternalError`` instead of forwarding
- ``reset``     reset both connections (RST, via SO_LINGER 0) instead of forwarding
- ``stall``     forward the request, hold the response until ``stall_seconds`` pass or the fault
  is cleared or expires, then deliver it
- ``cut``       forward the request, deliver the response head and at most ``cut_after`` body
  bytes (never the whole body: at most half of it), then close (FIN) — only the Content-Length
  tells the client that the body is short; a response without a body (HEAD) is cut before its
  first byte
- ``outage``    reset every connection, open or new, and every request

``refuse_if_match`` (an attribute, not a fault) makes the proxy a store without conditional
GETs: every request with an ``If-Match`` header is answered ``501 Not Implemented``.
``authorize`` (an attribute: a function of a request head) makes it a store that checks
credentials: a request it returns False for is answered ``403 AccessDenied`` (counted in
``stats.denied``); ``cachefs.testing.iam`` has one for IBM IAM bearer tokens.

``http=False`` makes it a plain TCP relay for a server speaking TLS (whose requests it cannot
read): latency and ``stats.bytes_down`` (TLS records, a percent or so above the payload) still
apply; ``stats.requests``, faults other than ``outage``, ``refuse_if_match`` and ``authorize`` do
not.

``inject`` also takes a tuple of kinds (not ``outage``): each faulted request then gets one of
them at random, e.g. ``inject(("error", "reset", "cut"), rate=0.1)``. ``stats`` counts
connections, requests, bytes sent by the server (``bytes_down``) and faults per kind, and keeps
the request line (method and target) of the last FAULTED_KEPT requests that drew a fault. After
an ``error`` the connection is closed (``Connection: close``), as S3 does.

It runs trio in a thread of its own, so a test, the benchmark or the CLI use it synchronously:
per connection and direction one task reads and one delivers. Measured on 2 cores, with client
and server on the same machine: 600-900 MB/s over 8-200 connections, ~300 MB/s as 2,300
requests/s of 128 KiB over 300-600 connections, at about 60 % of one core. Creating a proxy
raises the process's soft limit on open files (two per connection).

Usage: ``python -m cachefs.testing.proxy --listen 127.0.0.1:9000 --target 127.0.0.1:8333
--latency-ms 10`` (one-way milliseconds: 10 = +20 ms per round trip).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import random
import re
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

FAULT_KINDS = ("error", "error500", "reset", "stall", "cut", "outage")
CHUNK = 128 * 1024  # bytes per recv; below glibc's initial mmap threshold would be 128 KiB too
MAX_QUEUED = 16 * 1024 * 1024  # bytes in flight per direction: 320 MB/s at 50 ms one way
MAX_HEAD = 64 * 1024  # a longer request head is not HTTP we understand: forwarded untouched
CONNECT_TIMEOUT = 10.0
DRAIN_SECONDS = 10.0  # after an error response, read (and drop) what the client still sends
DEFAULT_CUT_AFTER = 1000
WANT_FDS = 65536  # two per connection; Debian's default soft limit (1024) allows ~500
FAULTED_KEPT = 10_000  # request lines of faulted requests kept in Stats.faulted (~1 MB at most)

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_ERRORS = {  # kind: (status line, S3 code, Azure code)
    "error": (b"503 Slow Down", b"SlowDown", b"ServerBusy"),
    "error500": (b"500 Internal Server Error", b"InternalError", b"InternalError"),
    "no_if_match": (b"501 Not Implemented", b"NotImplemented", b"UnsupportedHeader"),
    "denied": (b"403 Forbidden", b"AccessDenied", b"AuthenticationFailed"),
}
_IF_MATCH = re.compile(rb"\r\nif-match:", re.IGNORECASE)


@dataclass
class FaultPlan:
    """What to inject; replaced as a whole by ``inject``."""

    kind: str | tuple[str, ...] | None = None  # one of FAULT_KINDS, a mix of them, or None
    rate: float = 1.0  # probability per request
    until: float = float("inf")  # time.monotonic() when the fault stops
    count: int | None = None  # faults still to inject; None = no limit
    stall_seconds: float = 30.0
    cut_after: int = DEFAULT_CUT_AFTER

    def active(self) -> bool:
        return self.kind is not None and time.monotonic() < self.until and self.count != 0


@dataclass
class Stats:
    """Counters, updated by the proxy's thread; read them from any thread."""

    connections: int = 0
    requests: int = 0
    denied: int = 0  # requests ``authorize`` refused
    bytes_down: int = 0  # bytes the servers sent, forwarded to clients (responses, egress)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    #: (kind, request line) of the latest faulted requests, e.g. ("error", "PUT /b/k?partNumber=2&...")
    faulted: collections.deque[tuple[str, str]] = field(
        default_factory=lambda: collections.deque(maxlen=FAULTED_KEPT))


class LatencyProxy:
    """One listening socket (127.0.0.1 and a free port unless ``listen`` says otherwise) forwarding
    to ``target``, with latency and faults.

    Use as a context manager or call ``close()``. ``latency`` (one way, seconds) may be changed
    at any time; it applies to chunks read after the change.
    """

    def __init__(self, target: tuple[str, int], latency: float = 0.0, listen: tuple[str, int] = ("127.0.0.1", 0),
                 seed: int | None = None, http: bool = True) -> None:
        self.target = target
        self.http = http  # parse requests (False: relay the bytes as they come, e.g. TLS)
        self.latency = latency
        #: answer every request with an If-Match header "501 Not Implemented", as a store
        #: without conditional GETs does (not a fault: a property of the store)
        self.refuse_if_match = False
        #: a request head -> whether the store accepts its credentials (None: any request)
        self.authorize: Callable[[bytes], bool] | None = None
        self.plan = FaultPlan()
        self.stats = Stats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        _raise_fd_limit()
        self._sock = socket.create_server(listen, backlog=1024)
        host, port = self._sock.getsockname()[:2]
        self.port: int = port
        self.host: str = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self._conns: set[_Connection] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._started = threading.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"proxy-{self.port}")
        self._thread.start()
        self._started.wait()
        if self._error is not None:
            raise RuntimeError("proxy failed to start") from self._error

    @property
    def address(self) -> str:
        """HOST:PORT to connect to."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """http://HOST:PORT to use as an endpoint URL."""
        return f"http://{self.address}"

    # -- control (any thread) -----------------------------------------------------------------

    def inject(self, kind: str | tuple[str, ...] | None, rate: float = 1.0, duration: float | None = None,
               stall_seconds: float = 30.0, count: int | None = None, cut_after: int = DEFAULT_CUT_AFTER) -> None:
        """Start injecting ``kind`` faults (None stops; a tuple: each fault picks one of them), at
        ``rate`` per request, for ``duration`` seconds and/or the next ``count`` faults (default:
        until changed). Replaces the previous plan."""
        kinds = (kind,) if isinstance(kind, str) else kind or ()
        if any(k not in FAULT_KINDS for k in kinds) or (len(kinds) > 1 and "outage" in kinds):
            raise ValueError(f"unknown fault {kind!r}; use one of {FAULT_KINDS} (or a mix without outage)")
        until = time.monotonic() + duration if duration is not None else float("inf")
        with self._lock:
            self.plan = FaultPlan(kind if len(kinds) != 1 else kinds[0], rate, until, count, stall_seconds, cut_after)
        self._call_soon(self._on_plan_change)

    def clear(self) -> None:
        """Stop injecting faults; held (stalled) responses are delivered now."""
        self.inject(None)

    def close(self) -> None:
        """Reset every connection and stop listening."""
        self._closing = True
        if self._thread.is_alive():
            self._call_soon(lambda: self._cancel.cancel() if self._cancel else None)
            self._thread.join()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call_soon(self, fn: Callable[[], object]) -> None:
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(fn)

    # -- the trio side ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
            self._started.set()
            raise

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        listener = trio.socket.from_stdlib_socket(self._sock)
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            self._started.set()
            while True:
                try:
                    client, _ = await listener.accept()
                except OSError as exc:  # EMFILE and the like: wait for connections to end
                    log.warning("proxy %s: accept failed: %s", self.address, exc)
                    await trio.sleep(0.1)
                    continue
                self.stats.connections += 1
                if self.plan.kind == "outage" and self.plan.active():
                    self.stats.faults["outage"] += 1
                    _reset(client)
                    continue
                nursery.start_soon(_Connection(self, client).run)

    def _roll(self) -> tuple[str | None, FaultPlan]:
        """The fault for the request that just arrived, if any, and its plan (trio thread)."""
        with self._lock:
            plan = self.plan
            if not plan.active() or not (plan.kind == "outage" or self._rng.random() < plan.rate):
                return None, plan
            if plan.count is not None:
                plan.count -= 1
            kind = plan.kind if isinstance(plan.kind, str) else self._rng.choice(plan.kind or ("",))
        self.stats.faults[kind] += 1
        return kind, plan

    def _on_plan_change(self) -> None:
        plan = self.plan
        outage = plan.kind == "outage" and plan.active()
        kinds = (plan.kind,) if isinstance(plan.kind, str) else plan.kind or ()
        stalling = plan.active() and "stall" in kinds
        for conn in list(self._conns):
            if outage:
                self.stats.faults["outage"] += 1
                conn.abort()
            else:  # responses held by an earlier stall go now, or when this one ends
                conn.to_client.release(_stall_end(plan) if stalling else 0.0)


def _stall_end(plan: FaultPlan) -> float:
    """In trio time: when a response stalled now under ``plan`` is delivered (unless the plan is
    replaced first)."""
    return trio.current_time() + min(plan.stall_seconds, plan.until - time.monotonic())


def _raise_fd_limit() -> None:
    """Raise this process's soft limit on open files towards WANT_FDS (as far as the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = WANT_FDS if hard == resource.RLIM_INFINITY else min(WANT_FDS, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _reset(sock: trio.socket.SocketType) -> None:
    """Close with RST rather than FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class _Pipe:
    """One direction of a connection: chunks delivered in order, each ``latency`` after it was
    read, unless held (stall) or cut short. At most MAX_QUEUED bytes wait."""

    def __init__(self, proxy: LatencyProxy, dst: trio.SocketStream) -> None:
        self.proxy = proxy
        self.dst = dst
        self.items: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.hold_until = 0.0  # trio time; stall: nothing is delivered before it
        self.sealed = False  # nothing more is accepted (after an error response or a cut)
        self._changed = trio.Event()  # items added, hold released
        self._space = trio.Event()

    async def put(self, data: bytes | None) -> None:
        """Queue ``data`` (None: end of stream, then FIN) for delivery after the latency."""
        while self.queued >= MAX_QUEUED and not self.sealed:
            self._space = trio.Event()
            await self._space.wait()
        if self.sealed:
            return
        self.items.append((trio.current_time() + self.proxy.latency, data))
        self.queued += len(data) if data else 0
        self._changed.set()

    async def put_last(self, data: bytes) -> None:
        """Queue ``data`` and end of stream; drop anything put after."""
        await self.put(data)
        await self.put(None)
        self.sealed = True

    def release(self, hold_until: float) -> None:
        if hold_until < self.hold_until:
            self.hold_until = hold_until
            self._changed.set()

    async def run(self) -> None:
        while True:
            if not self.items:
                self._changed = trio.Event()
                await self._changed.wait()
                continue
            due, data = self.items[0]
            due = max(due, self.hold_until)
            if due > trio.current_time():
                self._changed = trio.Event()
                with trio.move_on_at(due):
                    await self._changed.wait()
                continue
            self.items.popleft()
            if data is None:
                await self.dst.send_eof()
                return
            self.queued -= len(data)
            if self.queued < MAX_QUEUED:
                self._space.set()
            await self.dst.send_all(data)


class _Connection:
    """A client connection and its upstream twin; the request direction is parsed as HTTP/1.1."""

    def __init__(self, proxy: LatencyProxy, client: trio.socket.SocketType) -> None:
        self.proxy = proxy
        self.client_sock = client
        self.upstream_sock: trio.socket.SocketType | None = None
        self.aborted = False
        self._scope = trio.CancelScope()
        self._upstream_scope = trio.CancelScope()  # the task reading responses
        self.to_client = _Pipe(proxy, trio.SocketStream(client))
        self.to_server: _Pipe | None = None
        self.cut: tuple[bytes, int] | None = None  # (request method, body bytes) for the next response
        self._started = trio.current_time()

    def abort(self) -> None:
        """Reset both sides (any thread that runs trio code: the proxy's)."""
        self.aborted = True
        self._scope.cancel()

    async def run(self) -> None:
        self.proxy._conns.add(self)
        try:
            with self._scope:
                upstream = trio.socket.socket()
                self.upstream_sock = upstream
                with trio.fail_after(CONNECT_TIMEOUT):
                    await upstream.connect(self.proxy.target)
                for sock in (self.client_sock, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.to_server = _Pipe(self.proxy, trio.SocketStream(upstream))
                # Behind a TCP handshake the first bytes leave one round trip after connect() and
                # arrive half a round trip later.
                self.to_server.hold_until = self._started + 3 * self.proxy.latency
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, self._requests)
                    nursery.start_soon(self._guard, self.to_server.run)
                    nursery.start_soon(self._guard, self._responses)
                    nursery.start_soon(self._guard, self.to_client.run)
        except (OSError, trio.TooSlowError):
            self.aborted = True
        except Exception:
            log.exception("proxy %s: connection failed", self.proxy.address)
            self.aborted = True
        finally:
            self.proxy._conns.discard(self)
            socks = [self.client_sock] + ([self.upstream_sock] if self.upstream_sock is not None else [])
            for sock in socks:
                if self.aborted or self.proxy._closing:
                    _reset(sock)
                else:
                    sock.close()

    async def _guard(self, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.abort()

    async def _requests(self) -> None:
        """Client to server: find each request head, decide its fault, forward or answer."""
        assert self.to_server is not None
        client = self.to_client.dst
        to_server = self.to_server
        head = bytearray()
        body_left = 0
        opaque = not self.proxy.http  # not parseable (TLS, chunked body, huge head): forward as is
        while True:
            data = await client.receive_some(CHUNK)
            if not data:
                await to_server.put(None)
                return
            if opaque:
                await to_server.put(data)
                continue
            view = memoryview(data)
            while view:
                if body_left:
                    n = min(body_left, len(view))
                    await to_server.put(data if n == len(data) else bytes(view[:n]))
                    body_left -= n
                    view = view[n:]
                    continue
                head += view
                view = memoryview(b"")
                end = head.find(b"\r\n\r\n")
                if end < 0:
                    if len(head) > MAX_HEAD:
                        opaque = True
                        await to_server.put(bytes(head))
                    break
                request, rest = bytes(head[: end + 4]).lstrip(b"\r\n"), bytes(head[end + 4:])
                head.clear()
                view = memoryview(rest)
                self.proxy.stats.requests += 1
                if self.proxy.refuse_if_match and _IF_MATCH.search(request):
                    await self._answer_error("no_if_match", request)
                    return
                if self.proxy.authorize is not None and not self.proxy.authorize(request):
                    self.proxy.stats.denied += 1
                    await self._answer_error("denied", request)
                    return
                fault, plan = self.proxy._roll()
                if fault is not None:
                    line = request.split(b"\r\n", 1)[0][:300].decode("latin-1")
                    self.proxy.stats.faulted.append((fault, line))
                if fault in ("reset", "outage"):
                    self.abort()
                    return
                if fault in _ERRORS:
                    await self._answer_error(fault, request)
                    return
                if fault == "stall":
                    self.to_client.hold_until = _stall_end(plan)
                elif fault == "cut":
                    self.cut = (request.split(b" ", 1)[0], plan.cut_after)
                if _CHUNKED.search(request):
                    opaque = True
                    await to_server.put(request + rest)
                    break
                await to_server.put(request)
                match = _CONTENT_LENGTH.search(request)
                body_left = int(match.group(1)) if match else 0

    async def _answer_error(self, kind: str, request: bytes) -> None:
        """Answer ``request`` with an error in the store's dialect, then close (reading what the
        client still sends, so that closing does not turn into a reset)."""
        status, s3_code, azure_code = _ERRORS[kind]
        azure = b"\r\nx-ms-version:" in request.lower()
        code = azure_code if azure else s3_code
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code + b"</Code><Message>"
                b"Injected by cachefs.testing.proxy.</Message></Error>")
        head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/xml\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\nConnection: close\r\n"
                + (b"x-ms-error-code: " + code + b"\r\n" if azure else b"") + b"\r\n")
        self._upstream_scope.cancel()  # whatever the server would still send is not wanted
        await self.to_client.put_last(head if request.startswith(b"HEAD ") else head + body)
        assert self.to_server is not None
        await self.to_server.put(None)  # the server never saw the request: let it close
        with trio.move_on_after(DRAIN_SECONDS):
            while await self.to_client.dst.receive_some(CHUNK):
                pass
            return
        self.abort()

    async def _responses(self) -> None:
        """Server to client: forward, or cut the response to a request that drew ``cut``."""
        assert self.to_server is not None
        upstream = self.to_server.dst
        head = bytearray()
        with self._upstream_scope:
            while True:
                data = await upstream.receive_some(CHUNK)
                if not data:
                    if self.cut is not None:  # the server closed before the cut point
                        await self.to_client.put(bytes(head[: len(head) // 2]))
                    await self.to_client.put(None)
                    return
                self.proxy.stats.bytes_down += len(data)
                if self.cut is None:
                    await self.to_client.put(data)
                    continue
                head += data
                cut = self._cut_point(head)
                if cut is not None:
                    self.cut = None
                    await self.to_client.put_last(bytes(head[:cut]))
                    return
        # cancelled by an error answer: the client side finishes the connection

    def _cut_point(self, response: bytearray) -> int | None:
        """Where to cut ``response`` (bytes received so far), or None to wait for more."""
        assert self.cut is not None
        method, cut_after = self.cut
        start = 0
        while True:
            end = response.find(b"\r\n\r\n", start)
            if end < 0:
                return len(response) // 2 if len(response) > MAX_HEAD else None
            status = response[start + 9: start + 12]
            if not status.startswith(b"1"):  # 100 Continue is not the response
                break
            start = end + 4
        head_end = end + 4
        match = _CONTENT_LENGTH.search(response, start, head_end)
        length = int(match.group(1)) if match else None
        if method == b"HEAD" or length == 0 or status in (b"204", b"304"):
            # No body to cut. Half a head is not enough: http.client takes the end of the
            # stream for the end of the headers. Nothing at all is a cut any client sees.
            return start
        allowed = min(cut_after, length // 2) if length is not None else cut_after
        if len(response) - head_end > allowed:
            return head_end + allowed
        return None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cachefs.testing.proxy",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default: a free port)")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="one-way delay per chunk in ms, each direction (10 = +20 ms per round trip)")
    parser.add_argument("--fault", help=f"inject these faults (comma-separated: {', '.join(FAULT_KINDS)})")
    parser.add_argument("--fault-rate", type=float, default=0.1, help="probability per request (default 0.1)")
    args = parser.parse_args()
    lhost, lport = args.listen.rsplit(":", 1)
    thost, tport = args.target.rsplit(":", 1)
    proxy = LatencyProxy((thost, int(tport)), args.latency_ms / 1000, (lhost, int(lport)))
    if args.fault:
        kinds = tuple(args.fault.split(","))
        proxy.inject(kinds if len(kinds) > 1 else kinds[0], rate=args.fault_rate)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"listening on {proxy.address} -> {args.target}, +{2 * args.latency_ms:g} ms per round trip",
          flush=True)
    stop.wait()
    proxy.close()
    s = proxy.stats
    print(f"{s.connections} connections, {s.requests} requests, faults {dict(s.faults)}", flush=True)


if __name__ == "__main__":
    main()
