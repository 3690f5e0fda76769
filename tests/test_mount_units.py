"""The systemd mount and automount examples (daemon/mnt-train.*): systemd accepts them, and
their options are ones the mount(8) helper takes (the mounts themselves: tests/fuse/test_fstab.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cachefs.mounthelper import translate

DAEMON = Path(__file__).resolve().parents[1] / "daemon"


def settings(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_mount_units_verify() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: ./install.sh --test installs the systemd package"
    units = [str(DAEMON / "mnt-train.mount"), str(DAEMON / "mnt-train.automount")]
    res = subprocess.run([analyze, "verify", "--man=no", *units], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


def test_mount_unit_after_network_and_options_accepted() -> None:
    mount, automount = settings(DAEMON / "mnt-train.mount"), settings(DAEMON / "mnt-train.automount")
    for unit in (mount, automount):
        assert unit["Wants"] == unit["After"] == "network-online.target"
        assert unit["WantedBy"] == "remote-fs.target"
    assert mount["Where"] == automount["Where"] == "/mnt/train"  # the unit names say so too
    assert mount["Type"] == "fuse.cachefs"
    args = translate(mount["What"], mount["Where"], mount["Options"].split(","))
    assert args[:3] == ["mount", mount["What"], "/mnt/train"]
    assert "--credentials" in args and "--read-write" not in args  # ro, with a credentials file
