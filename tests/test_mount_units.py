"""The systemd mount and automount examples (daemon/mnt-train.*) and the README's fstab line:
systemd accepts them (systemd-analyze; systemd's fstab generator), and their options are ones the
mount(8) helper takes. No systemd runs here (no PID 1 systemd): the mounts themselves are in
tests/fuse/test_fstab.py."""

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


def readme_fstab_line() -> str:
    lines = [line for line in (DAEMON.parent / "README.md").read_text().splitlines()
             if " fuse.cachefs " in line and line.startswith("s3://")]
    assert len(lines) == 1, lines
    return lines[0]


def test_readme_fstab_line_mounts_after_the_network(tmp_path: Path) -> None:
    """systemd's own fstab generator turns the README's line into a mount wanted by
    remote-fs.target (ordered after network-online.target), and with x-systemd.automount into
    an automount; the helper takes its options."""
    generator = Path("/lib/systemd/system-generators/systemd-fstab-generator")
    assert generator.exists(), "systemd-fstab-generator is missing: ./install.sh --test installs systemd"
    line = readme_fstab_line()
    source, where, fstype, options = line.split()[:4]
    assert fstype == "fuse.cachefs" and "_netdev" in options.split(",") and "ro" in options.split(",")
    assert "--read-write" not in translate(source, where, options.split(","))
    fstab = tmp_path / "fstab"
    automount = line.replace(where, "/mnt/val").replace(options, options + ",x-systemd.automount")
    fstab.write_text(line + "\n" + automount + "\n")
    out = tmp_path / "out"
    out.mkdir()
    env = {"SYSTEMD_FSTAB": str(fstab), "SYSTEMD_PROC_CMDLINE": "", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = subprocess.run([str(generator), str(out), str(out), str(out)], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    unit = settings(out / "mnt-train.mount")
    assert (unit["What"], unit["Where"], unit["Type"]) == (source, where, fstype)
    assert (out / "remote-fs.target.wants" / "mnt-train.mount").exists()
    assert (out / "remote-fs.target.wants" / "mnt-val.automount").exists()
    assert settings(out / "mnt-val.automount")["Where"] == "/mnt/val"
