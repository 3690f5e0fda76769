"""Malformed input through the real ``cachefs`` command: every bad command line, config file
value and environment value is one line on stderr, a nonzero exit code (2 for usage, 3 for the
store, 4 for the mountpoint or cache dir), no traceback, and nothing left mounted.
(The cases of tests/unit/test_source_config.py and tests/fuse/test_mount.py are not repeated.)
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.fuse.mounts import cachefs, fuse_mounts

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def place(tmp_path: Path) -> tuple[str, Path]:
    """(a file:// source that works, an empty mountpoint)."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a\n")
    (tmp_path / "mnt").mkdir()
    return f"file://{tmp_path / 'src'}", tmp_path / "mnt"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CACHEFS_", "AWS_", "AZURE_"))}
    env.update(extra)
    return env


def check(args: list[str], code: int, needle: str, mnt: Path | None = None,
          env: dict[str, str] | None = None) -> str:
    res = cachefs(*args, env=env or clean_env(), timeout=60)
    if res.returncode == 0 and mnt is not None and str(mnt) in fuse_mounts():
        cachefs("unmount", str(mnt))  # accepted by mistake: do not leave it mounted
    lines = res.stderr.strip().splitlines()
    assert res.returncode == code, (args, res.returncode, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("cachefs: "), (args, res.stderr)
    assert needle in lines[0], (args, lines[0])
    assert "Traceback" not in res.stderr + res.stdout
    if mnt is not None:
        assert str(mnt) not in fuse_mounts(), args
    return lines[0]


OPTION_CASES = [
    (["--cache-size", "-5G"], "cache-size"),
    (["--cache-size", "12 parsecs"], "cache-size"),
    (["--cache-idle-evict", "soon"], "cache-idle-evict"),
    (["--metadata-ttl", "-1"], "metadata-ttl"),
    (["--prefetch-concurrency", "many"], "prefetch-concurrency"),
    (["--backend-timeout", "0"], "backend-timeout"),
    (["--backend-timeout", "1 fortnight"], "backend-timeout"),
    (["--metrics-addr", "abc"], "metrics-addr"),
    (["--metrics-addr", "99999"], "metrics-addr"),
    (["--metrics-addr", "localhost:http"], "metrics-addr"),
    (["--log-format", "xml"], "log-format"),
    (["--uid", "root"], "uid"),
    (["--gid", "-1"], "gid"),
    (["--file-mode", "8"], "file-mode"),
    (["--dir-mode", "1000"], "dir-mode"),
    (["--tier-endpoint-url", "seaweedfs:8333"], "tier-endpoint-url"),
    (["--tier-timeout", "0"], "tier-timeout"),
]


@pytest.mark.parametrize(("extra", "needle"), OPTION_CASES, ids=[" ".join(c[0]) for c in OPTION_CASES])
def test_bad_option_values(place: tuple[str, Path], tmp_path: Path, extra: list[str], needle: str) -> None:
    src, mnt = place
    check(["mount", src, str(mnt), "--cache-dir", str(tmp_path / "cache"), *extra], 2, needle, mnt)
    assert not (tmp_path / "cache").exists()  # refused before anything was created


def test_metrics_address_that_cannot_be_bound(place: tuple[str, Path], tmp_path: Path) -> None:
    src, mnt = place
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        check(["mount", src, str(mnt), "--cache-dir", str(tmp_path / "cache"), "--metrics-addr", str(port)],
              2, "cannot listen", mnt)
    check(["mount", src, str(mnt), "--cache-dir", str(tmp_path / "cache"), "--metrics-addr", "192.0.2.1:9100"],
          2, "cannot listen", mnt)


CONFIG_CASES = [
    ('cache_size = "lots"\n', "cache-size"),
    ("cache_size = true\n", "cache-size"),
    ('prefetch = "maybe"\n', "prefetch"),
    ("prefetch_concurrency = 2.5\n", "prefetch-concurrency"),
    ("uid = 1.5\n", "uid"),
    ("uid = true\n", "uid"),
    ("backend_timeout = 0\n", "backend-timeout"),
    ('metrics_addr = "nowhere"\n', "metrics-addr"),
    ("file_mode = 444\n", "file-mode"),  # a TOML number is decimal: 444 is not the mode 0444
    ('cache_policy = "fifo"\n', "cache-policy"),
    ('no_such_option = 1\n', "unknown option"),
    ('cache_size = "1G"\ncache_size = "2G"\n', "cache.toml"),  # TOML: a key defined twice
    ("[section\n", "cache.toml"),
]


@pytest.mark.parametrize(("text", "needle"), CONFIG_CASES, ids=[c[0].strip() for c in CONFIG_CASES])
def test_bad_config_file_values(place: tuple[str, Path], tmp_path: Path, text: str, needle: str) -> None:
    src, mnt = place
    conf = tmp_path / "cache.toml"
    conf.write_text(text)
    line = check(["mount", src, str(mnt), "--cache-dir", str(tmp_path / "cache"), "--config", str(conf)],
                 2, needle, mnt)
    assert str(conf) in line  # says which file
    # the same file through $CACHEFS_CONFIG
    check(["mount", src, str(mnt), "--cache-dir", str(tmp_path / "cache")], 2, needle, mnt,
          env=clean_env(CACHEFS_CONFIG=str(conf)))


def test_config_file_that_cannot_be_read(place: tuple[str, Path], tmp_path: Path) -> None:
    src, mnt = place
    check(["mount", src, str(mnt), "--config", str(tmp_path / "missing.toml")], 2, "does not exist", mnt)
    check(["mount", src, str(mnt), "--config", str(tmp_path)], 2, "cannot read config file", mnt)
    check(["mount"], 2, "does not exist", env=clean_env(CACHEFS_CONFIG=str(tmp_path / "missing.toml")))


ENV_CASES = [
    ({"CACHEFS_CACHE_SIZE": "lots"}, "CACHEFS_CACHE_SIZE"),
    ({"CACHEFS_PREFETCH": "maybe"}, "CACHEFS_PREFETCH"),
    ({"CACHEFS_FOREGROUND": "2"}, "CACHEFS_FOREGROUND"),
    ({"CACHEFS_BACKEND_TIMEOUT": "0"}, "CACHEFS_BACKEND_TIMEOUT"),
    ({"CACHEFS_METRICS_ADDR": "abc"}, "CACHEFS_METRICS_ADDR"),
    ({"CACHEFS_UID": "-1"}, "CACHEFS_UID"),
    ({"CACHEFS_LOG_LEVEL": "chatty"}, "CACHEFS_LOG_LEVEL"),
    ({"CACHEFS_CONFIG": "/nonexistent/cachefs.toml"}, "does not exist"),
]


@pytest.mark.parametrize(("env", "needle"), ENV_CASES, ids=[next(iter(c[0])) for c in ENV_CASES])
def test_bad_environment_values(place: tuple[str, Path], tmp_path: Path, env: dict[str, str], needle: str) -> None:
    src, mnt = place
    check(["mount", src, str(mnt), "--cache-dir", str(tmp_path / "cache")], 2, needle, mnt, env=clean_env(**env))


def test_bad_credentials_settings(tmp_path: Path) -> None:
    """Credential *settings* that are wrong (the values themselves never appear)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    check(["mount", "az://data", str(mnt), "--cache-dir", str(tmp_path / "c1"), "--account", "acct1"], 2,
          "AZURE_STORAGE_KEY_FILE", mnt, env=clean_env(AZURE_STORAGE_KEY_FILE=str(tmp_path / "no-key")))
    check(["mount", "az://data", str(mnt), "--cache-dir", str(tmp_path / "c2")], 2, "no Azure account", mnt)
    check(["mount", "s3://bucket", str(mnt), "--cache-dir", str(tmp_path / "c3"), "--profile", "nosuch",
           "--endpoint-url", "http://127.0.0.1:9"], 3, "profile 'nosuch' not found", mnt,
          env=clean_env(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none")))
    tier = ["--endpoint-url", "http://127.0.0.1:9", "--tier-endpoint-url", "http://127.0.0.1:9"]
    check(["mount", "s3://bucket", str(mnt), "--cache-dir", str(tmp_path / "c4"), *tier], 2,
          "CACHEFS_TIER_SECRET_ACCESS_KEY", mnt, env=clean_env(CACHEFS_TIER_ACCESS_KEY_ID="tier-key"))
    check(["mount", "s3://bucket", str(mnt), "--cache-dir", str(tmp_path / "c5"), *tier], 2,
          "CACHEFS_TIER_SECRET_ACCESS_KEY_FILE", mnt,
          env=clean_env(CACHEFS_TIER_ACCESS_KEY_ID="tier-key",
                        CACHEFS_TIER_SECRET_ACCESS_KEY_FILE=str(tmp_path / "no-key")))
    # a URL carrying a secret is refused without repeating it
    line = check(["mount", "s3://bucket", str(mnt), "--cache-dir", str(tmp_path / "c6"),
                  "--tier-endpoint-url", "http://key:s3cr3t@tier:8333"], 2, "tier-endpoint-url", mnt)
    assert "s3cr3t" not in line


def test_bad_command_lines(place: tuple[str, Path], tmp_path: Path) -> None:
    src, mnt = place
    check([], 2, "required")
    check(["frobnicate"], 2, "invalid choice")
    check(["mount"], 2, "missing SOURCE")
    check(["mount", src], 2, "missing MOUNTPOINT")
    check(["mount", src, str(mnt), "extra"], 2, "unrecognized arguments")
    check(["mount", "s3://Bad_Bucket", str(mnt)], 2, "invalid bucket name", mnt)
    check(["mount", "cos://bucket", str(mnt)], 2, "--endpoint-url", mnt)
    check(["mount", "file://relative/dir", str(mnt)], 2, "must be absolute", mnt)
    check(["mount", "wasbs://nocontainer.blob.core.windows.net/x", str(mnt)], 2, "wasbs://", mnt)
    check(["mount", f"file://{tmp_path}/absent", str(mnt), "--cache-dir", str(tmp_path / "c")], 3,
          "does not exist", mnt)
    check(["demo", "--files", "many"], 2, "invalid int value")
    check(["status", str(tmp_path)], 4, "is not a cachefs mount")
    check(["prefetch", str(tmp_path)], 4, "is not a cachefs mount")
    check(["unmount", str(mnt)], 4, "is not mounted")
    check(["prefetch", str(mnt), "--from-list", str(tmp_path / "no-list.txt")], 2, "cannot read")
    check(["status"], 2, "required")
