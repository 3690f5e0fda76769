"""Who may use a mount's control socket (issue 10): root and the daemon's user by default; with
``--control-group GID`` also a non-root trainer whose groups include GID. Checked with a real
process of another uid (a child that drops root) against a real daemon's socket."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachefs import client

from .mounts import cachefs, mounted
from .stores import Bucket

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")]

TRAINER_UID = 65534  # nobody
TRAINER_GID = 65534
CONTROL_GID = 4242


def as_trainer(mnt: Path, groups: list[int], request: str) -> dict[str, object]:
    """Run ``cachefs.client.<request>`` in a child process as uid 65534 with ``groups``; its
    result or its error as a dict."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop root, then talk to the daemon
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(TRAINER_GID)
            os.setuid(TRAINER_UID)
            try:
                if request == "status":
                    out: dict[str, object] = {"ok": client.status(mnt)["source"]}
                else:
                    out = {"ok": client.announce(mnt, ["a/x"])}
            except Exception as exc:
                out = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return json.loads(text)  # type: ignore[no-any-return]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users may traverse (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="cachefs-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)  # after the mounts in it are gone


def test_control_socket_default_is_root_and_owner_only(s3_bucket: Bucket, shared_dir: Path, tmp_path: Path) -> None:
    s3_bucket.put("a/x", b"x")
    with mounted(s3_bucket.source, shared_dir / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args, "--allow-other") as m:
        assert client.status(m.path)["source"].startswith(s3_bucket.source)  # root
        out = as_trainer(m.path, [TRAINER_GID], "status")
        assert "error" in out and ("ermission denied" in str(out["error"]))
        out = as_trainer(m.path, [CONTROL_GID], "announce")  # a group means nothing without the option
        assert "error" in out


def test_control_group_lets_a_non_root_trainer_in(s3_bucket: Bucket, shared_dir: Path, tmp_path: Path) -> None:
    s3_bucket.put("a/x", b"x")
    sock = shared_dir / "control.sock"  # beside the mountpoint, as on a pod's shared hostPath
    with mounted(s3_bucket.source, shared_dir / "mnt", tmp_path / "cache", s3_bucket.mount_env,
                 *s3_bucket.mount_args, "--allow-other", "--control-group", str(CONTROL_GID),
                 "--control-socket", str(sock)) as m:
        st = sock.stat()
        assert st.st_gid == CONTROL_GID and st.st_mode & 0o777 == 0o660
        out = as_trainer(m.path, [TRAINER_GID, CONTROL_GID], "announce")  # a supplementary group
        assert out == {"ok": {"stream": "default", "items": [1]}}, out
        assert str(as_trainer(m.path, [CONTROL_GID], "status")["ok"]).startswith(s3_bucket.source)
        out = as_trainer(m.path, [TRAINER_GID], "status")  # not in the group: the file mode stops it
        assert "Permission denied" in str(out["error"]), out
        sock.chmod(0o666)  # a mode opened by mistake: the daemon still checks who is asking
        out = as_trainer(m.path, [TRAINER_GID], "status")
        assert "permission denied: the control socket of this mount is for root" in str(out["error"]), out
        assert "refused" in (tmp_path / "cache" / "cachefs.log").read_text()
    assert not sock.exists()


def test_control_socket_refuses_a_regular_file(s3_bucket: Bucket, shared_dir: Path, tmp_path: Path) -> None:
    (shared_dir / "precious").write_text("keep me")
    (shared_dir / "mnt").mkdir()
    res = cachefs("mount", s3_bucket.source, str(shared_dir / "mnt"), "--cache-dir", str(tmp_path / "cache"),
                  *s3_bucket.mount_args, "--control-socket", str(shared_dir / "precious"), env=s3_bucket.mount_env)
    assert res.returncode == 4 and "is not a socket" in res.stderr and len(res.stderr.splitlines()) == 1
    assert (shared_dir / "precious").read_text() == "keep me"
