"""Start real object-store servers on 127.0.0.1 for tests, the demo and the benchmark.

Each context manager starts one server on free ports, waits until it answers, yields a
``Server`` (endpoint, the environment a client needs, helpers to create a bucket and upload), and
stops the whole process group on exit:

- ``moto_server()``   moto's S3 server (closes the connection after every response);
- ``seaweed_server()`` SeaweedFS ``weed mini`` (a production S3 implementation; checks signatures);
- ``azurite_server()`` Azurite blob service (npm, installed by ``install.sh --test``).
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
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0

# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    kind: str  # "s3" or "azure"
    endpoint_url: str
    env: dict[str, str]  # what a client (and cachefs) needs in its environment
    workdir: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    # -- clients ------------------------------------------------------------------------------

    def s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=32,
                          retries={"max_attempts": 10, "mode": "standard"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def blob_service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.env["AZURE_STORAGE_CONNECTION_STRING"])

    def create_bucket(self, name: str) -> None:
        if self.kind == "s3":
            self.s3_client().create_bucket(Bucket=name)
        else:
            self.blob_service().create_container(name)

    def upload(self, bucket: str, objects: dict[str, bytes], workers: int = 16) -> None:
        if self.kind == "s3":
            client = self.s3_client()

            def put(item: tuple[str, bytes]) -> None:
                client.put_object(Bucket=bucket, Key=item[0], Body=item[1])
        else:
            container = self.blob_service().get_container_client(bucket)

            def put(item: tuple[str, bytes]) -> None:
                container.get_blob_client(item[0]).upload_blob(item[1], overwrite=True)

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(put, objects.items()))

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(Path(self.workdir, "server.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _wait_port(port: int, proc: subprocess.Popen[bytes], server: Server, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{what} exited with {proc.returncode}:\n{server.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise ServerError(f"{what} did not listen on port {port} within {START_TIMEOUT:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def _process(cmd: list[str], server: Server, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    log = open(Path(server.workdir, "server.log"), "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=server.workdir,
                            env=env, start_new_session=True)
    server.process = proc
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _ready(check: Any, server: Server, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            check()
            return
        except Exception as exc:
            last = exc
            if server.process is not None and server.process.poll() is not None:
                break
            time.sleep(0.2)
    raise ServerError(f"{what} is not answering ({last}):\n{server.log_tail()}")


@contextlib.contextmanager
def moto_server() -> Iterator[Server]:
    workdir = tempfile.mkdtemp(prefix="cachefs-moto-")
    port = free_port()
    env = {"AWS_ACCESS_KEY_ID": "moto-access-key", "AWS_SECRET_ACCESS_KEY": "moto-secret-key-123",
           "AWS_DEFAULT_REGION": "us-east-1"}
    server = Server("s3", f"http://127.0.0.1:{port}", env, workdir)
    try:
        with _process([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], server):
            _wait_port(port, server.process, server, "moto server")  # type: ignore[arg-type]
            _ready(lambda: server.s3_client().list_buckets(), server, "moto server")
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _weed_binary() -> str:
    for candidate in (Path(sys.executable).parent / "weed", shutil.which("weed")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise ServerError("the SeaweedFS binary `weed` is missing; run ./install.sh --test")


@contextlib.contextmanager
def seaweed_server() -> Iterator[Server]:
    """SeaweedFS ``weed mini`` with one S3 identity; every other service it offers is off."""
    weed = _weed_binary()
    workdir = tempfile.mkdtemp(prefix="cachefs-weed-")
    access, secret = "weed-access-key", "weed-secret-key-123"
    config = Path(workdir, "s3.json")
    config.write_text(json.dumps({"identities": [{
        "name": "cachefs-test", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3", "admin")}
    data = Path(workdir, "data")
    data.mkdir()
    cmd = [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", f"-s3.port={ports['s3']}", f"-admin.port={ports['admin']}",
           f"-master.port.grpc={free_port()}", f"-volume.port.grpc={free_port()}",
           f"-filer.port.grpc={free_port()}", f"-admin.port.grpc={free_port()}",
           f"-s3.port.grpc={free_port()}", f"-debug.port={free_port()}",
           "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-s3.config={config}", "-master.volumeSizeLimitMB=256"]
    env = {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1"}
    server = Server("s3", f"http://127.0.0.1:{ports['s3']}", env, workdir)
    try:
        with _process(cmd, server):
            _wait_port(ports["s3"], server.process, server, "SeaweedFS")  # type: ignore[arg-type]
            probe = f"probe-{os.getpid()}"

            def ready() -> None:
                client = server.s3_client()
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="x", Body=b"x")
                client.get_object(Bucket=probe, Key="x")["Body"].read()

            _ready(ready, server, "SeaweedFS")
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _azurite_binary() -> str:
    candidates = [os.environ.get("CACHEFS_AZURITE"), str(REPO / ".venv/azurite/node_modules/.bin/azurite-blob"),
                  str(Path(sys.executable).parent.parent / "azurite/node_modules/.bin/azurite-blob"),
                  shutil.which("azurite-blob")]
    for c in candidates:
        if c and Path(c).exists():
            return c
    raise ServerError("Azurite is missing; run ./install.sh --test")


@contextlib.contextmanager
def azurite_server() -> Iterator[Server]:
    binary = _azurite_binary()
    workdir = tempfile.mkdtemp(prefix="cachefs-azurite-")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
    conn = (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint={endpoint};")
    server = Server("azure", endpoint, {"AZURE_STORAGE_CONNECTION_STRING": conn}, workdir)
    cmd = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port),
           "--silent", "--skipApiVersionCheck", "--loose", "--inMemoryPersistence"]
    try:
        with _process(cmd, server):
            _wait_port(port, server.process, server, "Azurite")  # type: ignore[arg-type]
            _ready(lambda: list(server.blob_service().list_containers()), server, "Azurite")
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
