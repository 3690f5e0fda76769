"""The control socket: how ``cachefs prefetch``, ``cachefs status`` and ``cachefs.client`` talk
to a daemon.

A Unix stream socket in the cache namespace (or at ``--control-socket PATH``); the mount's root
directory names it in the extended attribute ``user.cachefs.control``, so a client needs only
the mountpoint. One JSON request per connection, one JSON reply.

Who may use it (checked twice: by the socket file's mode, and per connection by the peer's
credentials, ``SO_PEERCRED``): root and the daemon's own user; with ``--control-group GID``
also every process whose primary or supplementary group is GID (a non-root trainer in a pod
gets it with ``securityContext.supplementalGroups``). The socket is then mode 0660, group GID,
and a directory made for it is 0710, group GID; without it, 0600 in a 0700 directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import tempfile
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from .errors import CachefsError, MountError

log = logging.getLogger(__name__)

CONTROL_XATTR = "user.cachefs.control"
MAX_REQUEST = 256 << 20  # a --from-list of a few million paths


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


_UCRED = struct.Struct("3i")  # pid, uid, gid


def private_dir(group: int | None) -> str:
    """A fresh directory for a socket under the temporary directory: 0700, or 0710 with group
    ``group`` (members may reach the socket in it, not list it)."""
    path = tempfile.mkdtemp(prefix="cachefs-")
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o710)
    return path


def peer_allowed(uid: int, gid: int, pid: int, group: int | None) -> bool:
    """The access rule (see the module docstring)."""
    if uid in (0, os.geteuid()):
        return True
    if group is None:
        return False
    return gid == group or group in _groups_of(pid)


def _groups_of(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


async def serve(path: str, handler: Handler, *, group: int | None = None,
                task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    if os.path.exists(path):
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o660)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(partial(_handle, handler=handler, group=group), [listener])
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


async def _handle(stream: trio.SocketStream, *, handler: Handler, group: int | None = None) -> None:
    async with stream:
        pid, uid, gid = _UCRED.unpack(stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               _UCRED.size))
        if not peer_allowed(uid, gid, pid, group):
            log.warning("control request from uid %d (pid %d) refused: not root, not uid %d%s", uid, pid,
                        os.geteuid(), f", not in group {group}" if group is not None else "")
            reply = {"error": "permission denied: the control socket of this mount is for root, its "
                              "daemon's user" + (f" and group {group}" if group is not None else "")}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            return
        buf = bytearray()
        while not buf.endswith(b"\n") and len(buf) < MAX_REQUEST:
            chunk = await stream.receive_some(1 << 20)
            if not chunk:
                break
            buf += chunk
        try:
            # An announced order of a million paths is tens of MB of JSON: parse it off the
            # event loop, so FUSE requests are answered meanwhile.
            req = json.loads(buf) if len(buf) < 1 << 20 else await trio.to_thread.run_sync(json.loads, bytes(buf))
            reply = await handler(req)
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
