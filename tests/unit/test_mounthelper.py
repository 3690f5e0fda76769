"""The mount(8) helper's translation of -o options into `cachefs mount` arguments, and the
credentials file format (the mounts themselves: tests/fuse/test_fstab.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cachefs import config
from cachefs.credentials import read_file
from cachefs.errors import UsageError
from cachefs.mounthelper import parse_argv, translate


def opts(text: str, sloppy: bool = False) -> list[str]:
    return translate("s3://b", "/mnt", text.split(","), sloppy)[3:]


def test_every_cachefs_option_is_accepted_as_o_name_value() -> None:
    samples = {"cache_size": "200G", "cache_policy": "lru", "uid": "7", "gid": "8", "file_mode": "0440",
               "dir_mode": "0550", "log_level": "debug", "log_format": "json", "metrics_addr": "9100",
               "backend_timeout": "5", "prefetch_concurrency": "4", "rename_dir_limit": "3",
               "cache_idle_evict": "1h", "reclaim_after": "1d", "metadata_ttl": "0", "writeback_interval": "0",
               "tier_endpoint_url": "http://tier:8333", "tier_timeout": "3", "control_group": "4242"}
    for opt in config.OPTIONS:
        if opt.flag:
            want = [] if opt.key == "read_write" else [f"--{opt.name}"]
            assert opts(f"ro,{opt.key}") == want + (["--read-write"] if opt.key == "read_write" else [])
            assert opts(f"ro,{opt.key}=false") == []
        else:
            value = samples.get(opt.key, "/x" if opt.key in ("cache_dir", "credentials") else "v")
            assert opts(f"ro,{opt.key}={value}") == [f"--{opt.name}", value]
            assert opts(f"ro,{opt.name}={value}") == [f"--{opt.name}", value]  # dashes work too
    assert opts("ro,config=/etc/cachefs/a.toml") == ["--config", "/etc/cachefs/a.toml"]


def test_ro_rw_and_read_write_last_one_wins() -> None:
    assert opts("rw") == ["--read-write"]  # what mount(8) passes without ro
    assert opts("ro") == []
    assert opts("rw,ro") == [] and opts("ro,rw") == ["--read-write"]
    assert opts("ro,read_write") == ["--read-write"] and opts("rw,read_write=no") == []


def test_mount8_and_systemd_options_are_ignored() -> None:
    ignored = ("defaults,auto,noauto,_netdev,nofail,user,users,nouser,owner,group,exec,suid,nosuid,dev,"
               "nodev,sync,async,dirsync,noatime,relatime,strictatime,nodiratime,lazytime,default_permissions,"
               "x-systemd.automount,x-systemd.requires=network-online.target,x-systemd.idle-timeout=1min,"
               "x-mount.mkdir,comment=systemd.automount,user=alice")
    assert opts("ro," + ignored) == []
    assert opts("ro,allow_other,uid=1,gid=2,noexec") == ["--allow-other", "--uid", "1", "--gid", "2", "--noexec"]


@pytest.mark.parametrize(("text", "message"), [
    ("colour=blue", "unknown mount option 'colour'"),
    ("cache_size=lots", "-o cache_size=lots: not a size"),
    ("cache_size", "-o cache_size needs a value: cache_size=SIZE"),
    ("cache_size=", "-o cache_size needs a value"),
    ("prefetch=maybe", "-o prefetch=maybe: not a boolean"),
    ("file_mode=0999", "not an octal mode"),
    ("remount", "remounting is not supported"),
    ("config", "-o config needs a value"),
])
def test_bad_options(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        opts(text)


def test_sloppy_ignores_unknown_options_only() -> None:
    assert opts("ro,colour=blue", sloppy=True) == []
    with pytest.raises(UsageError):
        opts("cache_size=lots", sloppy=True)


def test_argv_in_mount8s_calling_convention() -> None:
    assert parse_argv(["s3://b", "/mnt", "-s", "-f", "-n", "-v", "-o", "ro,a=1", "-o", "b", "-t", "fuse.cachefs"]) == (
        ["s3://b", "/mnt"], ["ro", "a=1", "b"], {"s", "f", "n", "v"})
    assert parse_argv(["-oro", "-tfuse.cachefs", "-sfnv", "x", "y"]) == (["x", "y"], ["ro"], {"s", "f", "n", "v"})
    for bad, message in ((["x", "y", "-o"], "-o needs a value"), (["x", "y", "-q"], "unknown flag -q"),
                         (["x", "y", "-N", "1"], "not supported")):
        with pytest.raises(UsageError, match=message):
            parse_argv(bad)


def write(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "creds.env"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_credentials_file_format(tmp_path: Path) -> None:
    path = write(tmp_path, "# comment\n\nAWS_ACCESS_KEY_ID=AKIA\nexport AWS_SECRET_ACCESS_KEY = 'se=cr#et'\n"
                           'IBM_API_KEY_ID="k"\nAZURE_STORAGE_KEY=a==\n')
    assert read_file(path) == {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "se=cr#et",
                               "IBM_API_KEY_ID": "k", "AZURE_STORAGE_KEY": "a=="}


@pytest.mark.parametrize(("text", "mode", "message"), [
    ("AWS_ACCESS_KEY_ID=AKIA\n", 0o644, "readable by other users"),
    ("PATH=/tmp\n", 0o600, "line 1: expected NAME=value with a name starting AWS_, AZURE_ or IBM_"),
    ("AWS_ACCESS_KEY_ID=a\nSECRETVALUE\n", 0o600, "line 2"),
    ("# nothing\n", 0o600, "sets no variables"),
])
def test_bad_credentials_files(tmp_path: Path, text: str, mode: int, message: str) -> None:
    with pytest.raises(UsageError, match=message) as info:
        read_file(write(tmp_path, text, mode))
    assert "SECRETVALUE" not in str(info.value) and "AKIA" not in str(info.value)
