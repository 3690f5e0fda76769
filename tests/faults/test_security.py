"""Security through the real command: credentials never show (logs at debug level, error
messages, /metrics, ``cachefs status``, the process title), credentials on the command line are
refused, the cache dir is private (0700 / 0600 even under umask 000), ``--allow-other`` and
``--uid/--gid/--file-mode/--dir-mode`` decide what other users see, and the metrics server
listens on loopback unless told otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest

from cachefs.testing.servers import AZURITE_ACCOUNT, AZURITE_KEY, free_port
from tests.fuse.mounts import cachefs, fuse_mounts, mounted
from tests.fuse.stores import Bucket

from .helpers import Faulty, daemon_log, http_status

pytestmark = pytest.mark.timeout(300)

NOBODY = 65534


def scrape_text(port: int) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def exercise(b: Bucket, fb: Faulty, env: dict[str, str], tmp_path: Path, *extra: str) -> list[tuple[str, str]]:
    """Mount at debug level and do what produces output: reads, transient faults, an outage
    (EIO), a missing file, status, prefetch, metrics; then failing mounts. Returns (where, text)
    of everything a user or an operator could see."""
    seen: list[tuple[str, str]] = []
    objects = {f"sec/{i}.bin": os.urandom(20_000) for i in range(30)}
    b.put_many(objects)
    port = free_port()
    cache = tmp_path / "cache"
    args = [*b.mount_args, *extra, "--log-level", "debug", "--metrics-addr", str(port), "--backend-timeout", "3"]
    with mounted(b.source, tmp_path / "mnt", cache, env, *args) as m:
        pid = int(m.status()["pid"])
        for i in range(10):
            assert (m.path / f"sec/{i}.bin").read_bytes() == objects[f"sec/{i}.bin"]
        fb.proxy.inject(("error", "reset", "cut"), rate=0.25)
        for i in range(10, 20):
            assert (m.path / f"sec/{i}.bin").read_bytes() == objects[f"sec/{i}.bin"]
        fb.proxy.inject("outage")
        with pytest.raises(OSError) as info:
            (m.path / "sec/20.bin").read_bytes()
        assert info.value.errno == errno.EIO
        fb.proxy.clear()
        with pytest.raises(FileNotFoundError):
            (m.path / "sec/nope.bin").read_bytes()
        for cmd in (["status", str(m.path)], ["status", "--json", str(m.path)],
                    ["prefetch", str(m.path), "--wait"], ["prefetch", str(m.path), "sec/none"]):
            res = cachefs(*cmd, env=env)
            seen.append((" ".join(cmd[:2]), res.stdout + res.stderr))
        seen.append(("/metrics", scrape_text(port)))
        assert http_status(port, "/healthz") == 200
        seen.append(("/proc/PID/cmdline", Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()))
        seen.append(("/proc/PID/comm", Path(f"/proc/{pid}/comm").read_text()))
    log = daemon_log(cache)
    assert " DEBUG " in log and "retry" in log  # debug logging was on, and faults were logged
    assert "Request headers" not in log  # the SDKs' per-request logging stays out of the log
    seen.append(("log", log))
    # Mounts that fail: a missing bucket, an unreachable endpoint.
    missing = b.source.rsplit("/", 1)[0] + "/no-such-bucket-zz" if b.kind == "s3" else "az://no-such-container-zz"
    for source, more in ((missing, []), (b.source, ["--backend-timeout", "1"])):
        fb.proxy.inject("outage") if more else fb.proxy.clear()
        res = cachefs("mount", source, str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c2"),
                      *b.mount_args, *extra, *more, "--log-level", "debug", env=env, timeout=60)
        fb.proxy.clear()
        assert res.returncode != 0 and str(tmp_path / "mnt") not in fuse_mounts()
        seen.append((f"mount {source} stderr", res.stderr))
    seen.append(("log of failed mounts", daemon_log(tmp_path / "c2")))
    return seen


def assert_no_secret(seen: list[tuple[str, str]], secrets: list[str]) -> None:
    for secret in secrets:
        forms = {secret, quote(secret, safe=""), quote(secret)}
        for where, text in seen:
            for form in forms:
                assert form not in text, f"a credential appears in {where}"


def test_s3_credentials_never_show(faulty_moto: Faulty, tmp_path: Path) -> None:
    secret = f"S3cr3t-{uuid.uuid4().hex}"
    token = f"T0ken-{uuid.uuid4().hex}"
    b = faulty_moto.bucket
    env = dict(b.mount_env, AWS_SECRET_ACCESS_KEY=secret, AWS_SESSION_TOKEN=token)
    seen = exercise(b, faulty_moto, env, tmp_path)
    assert_no_secret(seen, [secret, token])


def test_ibm_api_key_and_iam_tokens_never_show(faulty_moto: Faulty, tmp_path: Path) -> None:
    from cachefs.testing.iam import IamServer

    key = f"IbmK3y-{uuid.uuid4().hex}"
    b = faulty_moto.bucket
    with IamServer(key, ttl=3) as iam:
        faulty_moto.proxy.authorize = iam.authorize  # the store refuses requests without a valid token
        env = {k: v for k, v in b.mount_env.items() if not k.startswith("AWS_")}
        env.update(IBM_API_KEY_ID=key, IBM_AUTH_ENDPOINT=iam.url, AWS_EC2_METADATA_DISABLED="true")
        seen = exercise(b, faulty_moto, env, tmp_path)
        # A wrong key: its error must not show the key either.
        wrong = f"Wr0ngK3y-{uuid.uuid4().hex}"
        res = cachefs("mount", b.source, str(tmp_path / "mnt"), "--cache-dir", str(tmp_path / "c3"),
                      *b.mount_args, "--log-level", "debug", env=dict(env, IBM_API_KEY_ID=wrong), timeout=60)
        assert res.returncode == 3 and "refused the API key" in res.stderr, res.stderr
        seen += [("wrong key stderr", res.stderr), ("wrong key log", daemon_log(tmp_path / "c3"))]
        tokens = list(iam.issued)
    assert len(tokens) >= 2 and iam.denied == []
    assert_no_secret(seen, [key, wrong, *tokens])


def test_azure_account_key_never_shows(faulty_azurite: Faulty, tmp_path: Path) -> None:
    b = faulty_azurite.bucket
    conn = b.mount_env["AZURE_STORAGE_CONNECTION_STRING"]
    assert AZURITE_KEY in conn
    seen = exercise(b, faulty_azurite, b.mount_env, tmp_path)
    assert_no_secret(seen, [AZURITE_KEY, conn])


def test_azure_sas_token_never_shows(faulty_azurite: Faulty, tmp_path: Path) -> None:
    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    b = faulty_azurite.bucket
    sas = generate_container_sas(AZURITE_ACCOUNT, b.name, account_key=AZURITE_KEY,
                                 permission=ContainerSasPermissions(read=True, list=True),
                                 expiry=datetime.now(UTC) + timedelta(hours=1))
    sig = next(p.split("=", 1)[1] for p in sas.split("&") if p.startswith("sig="))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AZURE_")}
    env["AZURE_STORAGE_SAS_TOKEN"] = sas
    seen = exercise(b, faulty_azurite, env, tmp_path, "--account", AZURITE_ACCOUNT, "--endpoint-url", b.endpoint_url)
    assert_no_secret(seen, [sas, sig, AZURITE_KEY])


@pytest.mark.parametrize("args", [
    ["https://acct1.blob.core.windows.net/data/train?sv=2022-11-02&sig=SeCrEtSiG%3D"],
    ["wasbs://data@acct1.blob.core.windows.net/train?se=2030-01-01&sp=rl&sig=SeCrEtSiG"],
    ["az://data/train?sig=SeCrEtSiG"],
    ["s3://AKIAEXAMPLE:SeCrEtKeY@bucket/train"],
    ["s3://bucket/train?X-Amz-Credential=AKIA&X-Amz-Signature=SeCrEtSiG"],
    ["s3://bucket", "--endpoint-url", "https://AKIAEXAMPLE:SeCrEtKeY@s3.example.com"],
    ["cos://bucket", "--endpoint-url", "https://s3.example.com/?X-Amz-Security-Token=SeCrEtToK"],
], ids=["https-sas", "wasbs-sas", "az-sas", "s3-userinfo", "s3-presigned", "endpoint-userinfo", "endpoint-token"])
def test_credentials_on_the_command_line_are_refused(tmp_path: Path, args: list[str]) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cachefs("mount", args[0], str(mnt), *args[1:], "--cache-dir", str(tmp_path / "cache"), timeout=60)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "credentials in" in res.stderr and "refused" in res.stderr
    assert "SeCrEt" not in res.stderr + res.stdout
    assert not (tmp_path / "cache").exists() and str(mnt) not in fuse_mounts()
    # The same SOURCE from the environment is refused too (it would still reach the logs).
    if not args[0].startswith(("s3://bucket", "cos://")):
        res = cachefs("mount", "--cache-dir", str(tmp_path / "cache"), timeout=60,
                      env=dict(os.environ, CACHEFS_SOURCE=args[0], CACHEFS_MOUNTPOINT=str(mnt)))
        assert res.returncode == 2 and "refused" in res.stderr and "SeCrEt" not in res.stderr


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_cache_dir_is_private_even_under_umask_000(faulty_moto: Faulty, tmp_path: Path) -> None:
    b = faulty_moto.bucket
    b.put_many({f"p/{i}.bin": os.urandom(5_000 + i) for i in range(5)} | {"p/big.bin": os.urandom(9 << 20)})
    cache = tmp_path / "cache"  # created by cachefs
    with umask(0), mounted(b.source, tmp_path / "mnt", cache, b.mount_env, *b.mount_args) as m:
        for i in range(5):
            (m.path / f"p/{i}.bin").read_bytes()
        (m.path / "p/big.bin").read_bytes()
        kinds: dict[str, int] = {}
        bad = []
        for root, dirs, files in os.walk(cache):
            for name in [*dirs, *files, ""] if root == str(cache) else [*dirs, *files]:
                p = os.path.join(root, name) if name else root
                st = os.lstat(p)
                mode = stat.S_IMODE(st.st_mode)
                kind = "dir" if stat.S_ISDIR(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "file"
                kinds[kind] = kinds.get(kind, 0) + 1
                want = 0o700 if kind == "dir" else 0o600
                if mode != want:
                    bad.append(f"{os.path.relpath(p, cache)} {mode:o}")
        names = {os.path.basename(p) for p, _, _ in os.walk(cache)} | {
            f for _, _, fs in os.walk(cache) for f in fs}
        sock = os.getxattr(m.path, "user.cachefs.control").decode()  # may live in /tmp (path length)
        sock_mode = stat.S_IMODE(os.stat(sock).st_mode)
    print(f"\ncache dir under umask 000: {kinds}; control socket {sock_mode:o}; wrong: {bad}")
    assert sock_mode == 0o600
    assert {"data.mdb", "lock.mdb", "lock", "cachefs.log", "data", "meta"} <= names
    assert kinds.get("file", 0) == 5 + 3 + 4  # 5 small files, 3 blocks of the big one, 2 LMDB, lock, log
    assert bad == [], bad


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="cachefs-sec-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def try_read(path: Path) -> str:
    """What user nobody gets reading path with cat: 'ok', 'EACCES', or cat's message."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    res = subprocess.run(["cat", str(path)], capture_output=True, text=True, timeout=30, preexec_fn=drop)
    if res.returncode == 0:
        return "ok"
    return "EACCES" if "Permission denied" in res.stderr else res.stderr


def mount_options(mnt: Path) -> set[str]:
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if parts[1] == str(mnt):
                return set(parts[3].split(","))
    raise AssertionError(f"{mnt} is not mounted")


def test_allow_other_and_what_users_see(faulty_moto: Faulty, shared_dir: Path) -> None:
    b = faulty_moto.bucket
    b.put_many({"u/file.txt": b"visible?\n"})
    mnt, cache = shared_dir / "mnt", shared_dir / "cache"
    env, base = b.mount_env, b.mount_args
    # Default: only the mounting user; the kernel keeps everyone else out.
    with mounted(b.source, mnt, cache, env, *base) as m:
        opts = mount_options(m.path)
        assert "allow_other" not in opts and "default_permissions" not in opts and "ro" in opts
        assert try_read(m.path / "u/file.txt") == "EACCES"
        st = os.stat(m.path / "u/file.txt")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (os.getuid(), os.getgid(), 0o444)
        assert stat.S_IMODE(os.stat(m.path / "u").st_mode) == 0o555
    # --allow-other brings default_permissions: the modes shown are enforced by the kernel.
    with mounted(b.source, mnt, cache, env, *base, "--allow-other", "--uid", "1234", "--gid", "5678",
                 "--file-mode", "0440", "--dir-mode", "0750") as m:
        opts = mount_options(m.path)
        assert {"allow_other", "default_permissions"} <= opts
        st = os.stat(m.path / "u/file.txt")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o440)
        st = os.stat(m.path / "u")
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o750)
        assert try_read(m.path / "u/file.txt") == "EACCES"  # nobody is neither owner nor group
    with mounted(b.source, mnt, cache, env, *base, "--allow-other", "--uid", str(NOBODY), "--file-mode", "0400",
                 "--dir-mode", "0500") as m:
        assert try_read(m.path / "u/file.txt") == "ok"  # nobody owns it now
    with mounted(b.source, mnt, cache, env, *base, "--allow-other") as m:
        assert try_read(m.path / "u/file.txt") == "ok"  # 0444 / 0555 by default: everyone reads


def listening(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on port."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, _, hexport = local.partition(":")
                if state == "0A" and int(hexport, 16) == port:
                    out.add(addr)
    return out


def test_metrics_listen_on_loopback_unless_told(faulty_moto: Faulty, tmp_path: Path) -> None:
    b = faulty_moto.bucket
    port = free_port()
    with mounted(b.source, tmp_path / "mnt", tmp_path / "cache", b.mount_env, *b.mount_args,
                 "--metrics-addr", str(port)):
        assert listening(port) == {"0100007F"}  # 127.0.0.1
        assert http_status(port, "/healthz") == 200
    port = free_port()
    with mounted(b.source, tmp_path / "mnt", tmp_path / "cache", b.mount_env, *b.mount_args,
                 "--metrics-addr", f"0.0.0.0:{port}"):
        assert listening(port) == {"00000000"}  # asked for: every interface
