"""The control socket: how ``cachefs prefetch`` and ``cachefs status`` talk to a daemon.

A Unix stream socket (mode 0600) in the cache namespace; the mount's root directory names it in
the extended attribute ``user.cachefs.control``, so a client needs only the mountpoint. One JSON
request per connection, one JSON reply.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from .errors import CachefsError, MountError

log = logging.getLogger(__name__)

CONTROL_XATTR = "user.cachefs.control"
MAX_REQUEST = 256 << 20  # a --from-list of a few million paths


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def serve(path: str, handler: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(partial(_handle, handler=handler), [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _handle(stream: trio.SocketStream, *, handler: Handler) -> None:
    async with stream:
        buf = bytearray()
        while not buf.endswith(b"\n") and len(buf) < MAX_REQUEST:
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                break
            buf += chunk
        try:
            reply = await handler(json.loads(buf))
        except Exception as exc:
            log.warning("control request failed: %s", exc)
            reply = {"error": str(exc)}
        await stream.send_all(json.dumps(reply).encode() + b"\n")


def socket_path(mountpoint: str) -> str:
    try:
        return os.getxattr(mountpoint, CONTROL_XATTR).decode()
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(f"{mountpoint}: the cachefs daemon is gone (stale mount); "
                             f"run: cachefs unmount {mountpoint}") from None
        raise MountError(f"{mountpoint} is not a cachefs mount") from None


def request(mountpoint: str, req: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the daemon serving ``mountpoint`` and return its reply."""
    path = socket_path(mountpoint)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = bytearray()
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise MountError(f"cannot reach the cachefs daemon of {mountpoint}: {exc.strerror or exc}") from None
    reply: dict[str, Any] = json.loads(buf)
    if "error" in reply:
        raise CachefsError(reply["error"])
    return reply
