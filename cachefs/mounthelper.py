"""``mount.fuse.cachefs``: the helper mount(8) runs for ``-t fuse.cachefs`` and fstab lines.

mount(8) looks for ``/sbin/mount.fuse.cachefs`` (``install.sh`` links it there) and runs it as
``mount.fuse.cachefs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] [-t fuse.cachefs]``. Without it,
mount(8) falls back to fuse3's ``mount.fuse``, which runs ``cachefs SOURCE MOUNTPOINT -o
OPTIONS`` from root's PATH; ``cachefs`` accepts that form too and comes here.

The options become a ``cachefs mount`` command line, which does the rest (daemonizes, returns
once the mount is ready, one line and a nonzero exit code on failure):

- every ``cachefs mount`` option as ``name=value`` (``cache_dir=/ssd``, ``cache_size=200G``;
  dashes or underscores), a flag as ``name`` (``prefetch``) or ``name=true|false``, and
  ``config=FILE``; credentials through ``credentials=FILE`` (see ``cachefs.credentials``);
- ``ro`` and ``rw``: mount(8) passes ``rw`` whenever ``ro`` is absent, so the usual rule of
  mount(8) holds: read-only with ``ro``, read-write (``--read-write``) otherwise; the last of
  ``ro``/``rw``/``read_write`` wins;
- ``allow_other``, ``uid=``, ``gid=``, ``noexec`` are honoured;
- ignored: what mount(8) and systemd use themselves (``defaults``, ``auto``, ``noauto``,
  ``_netdev``, ``nofail``, ``user``, ``users``, ``nouser``, ``owner``, ``group``, ``x-*``,
  ``comment=``, ``(u)helper=``), and what cachefs always decides (``exec``, ``suid``/``nosuid``, ``dev``/``nodev``:
  always nosuid,nodev; the atime family: always noatime; ``sync``/``async``: a closed file is
  already in the bucket; ``default_permissions``: implied by ``allow_other``);
- anything else is refused with one line (exit code 2), unless mount(8) was given ``-s``.

``-f`` (fake) checks the options and mounts nothing; ``-v`` prints the ``cachefs mount`` command
line; ``-n`` is accepted (there is no /etc/mtab to skip).
"""

from __future__ import annotations

import shlex
import sys

from . import config
from .errors import UsageError

PROG = "mount.fuse.cachefs"

_IGNORED = {
    "defaults", "auto", "noauto", "_netdev", "nofail", "user", "users", "nouser", "owner", "group",
    "exec", "suid", "nosuid", "dev", "nodev", "sync", "async", "dirsync", "default_permissions",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime",
    "nolazytime", "diratime", "nodiratime", "silent", "loud",
}
_IGNORED_PREFIXES = ("x-", "X-", "comment=", "user=", "helper=", "uhelper=")
_UNSUPPORTED = {"remount": "remounting is not supported: unmount and mount again",
                "bind": "bind mounts of a cachefs source are not supported",
                "rbind": "bind mounts of a cachefs source are not supported",
                "move": "moving a mount is not supported"}

USAGE = f"""usage: {PROG} SOURCE MOUNTPOINT [-sfnv] [-o OPTION[,OPTION...]] [-t fuse.cachefs]

Run by mount(8) for `mount -t fuse.cachefs SOURCE MOUNTPOINT -o ...` and fstab lines such as
  s3://bucket/train  /mnt/train  fuse.cachefs  ro,_netdev,nofail,credentials=/etc/cachefs/train.env,\
endpoint_url=https://s3.example.com,cache_dir=/var/cache/cachefs  0 0
Options: every `cachefs mount` option as name=value (underscores for dashes), flags as name;
ro (else read-write, as mount(8) passes rw), allow_other, uid=, gid=, noexec; mount(8)/systemd
options (defaults, noauto, _netdev, nofail, x-systemd.*, ...) are ignored. See `cachefs mount --help`.
"""


def translate(source: str, mountpoint: str, options: list[str], sloppy: bool = False) -> list[str]:
    """The ``cachefs mount`` arguments for a mount(8) call (raises UsageError for a bad option)."""
    args = ["mount", source, mountpoint]
    read_write = False
    for item in options:
        if not item:
            continue
        name, eq, value = item.partition("=")
        key = name.replace("-", "_")
        if item in _IGNORED or item.startswith(_IGNORED_PREFIXES):
            continue
        if key in _UNSUPPORTED:
            raise UsageError(f"-o {key}: {_UNSUPPORTED[key]}")
        if item in ("ro", "rw"):
            read_write = item == "rw"
            continue
        if key == "config":
            if not value:
                raise UsageError("-o config needs a value: config=FILE")
            args += ["--config", value]
            continue
        opt = config.BY_KEY.get(key)
        if opt is None:
            if sloppy:
                continue
            raise UsageError(f"unknown mount option {name!r} (see {PROG} --help)")
        if opt.flag:
            try:
                on = config.parse_bool(value) if eq else True
            except ValueError as exc:
                raise UsageError(f"-o {item}: {exc}") from None
            if key == "read_write":
                read_write = on
            elif on:
                args.append(f"--{opt.name}")
            continue
        if not eq or value == "":
            raise UsageError(f"-o {name} needs a value: {name}={opt.metavar or 'VALUE'}")
        try:
            opt.parse(value)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"-o {item}: {exc}") from None
        args += [f"--{opt.name}", value]
    if read_write:
        args.append("--read-write")
    return args


def parse_argv(argv: list[str]) -> tuple[list[str], list[str], set[str]]:
    """mount(8)'s calling convention -> (positional arguments, options, single-letter flags)."""
    positional: list[str] = []
    options: list[str] = []
    flags: set[str] = set()
    it = iter(argv)
    for arg in it:
        if arg in ("-o", "-t", "-N"):
            value = next(it, None)
            if value is None:
                raise UsageError(f"{arg} needs a value")
            if arg == "-o":
                options += value.split(",")
            elif arg == "-N":
                raise UsageError("-N (mount namespaces) is not supported")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg.startswith("-t"):
            pass
        elif arg in ("-h", "--help"):
            flags.add("h")
        elif arg.startswith("-") and len(arg) > 1:
            for letter in arg[1:]:
                if letter not in "sfnvr":
                    raise UsageError(f"unknown flag -{letter}")
                flags.add(letter)
        else:
            positional.append(arg)
    return positional, options, flags


def main(argv: list[str] | None = None) -> int:
    from .cli import _fail, build_parser
    from .cli import main as cachefs_main

    argv = sys.argv[1:] if argv is None else argv
    try:
        positional, options, flags = parse_argv(argv)
        if "h" in flags:
            print(USAGE, end="")
            return 0
        if len(positional) != 2:
            raise UsageError(f"expected SOURCE and MOUNTPOINT, got {len(positional)} argument(s) "
                             f"(see {PROG} --help)")
        if "r" in flags:
            options.append("ro")
        args = translate(positional[0], positional[1], options, sloppy="s" in flags)
        if "v" in flags:
            print(f"{PROG}: cachefs {shlex.join(args)}", file=sys.stderr)
        if "f" in flags:  # fake: check everything a mount would read first, mount nothing
            cfg = config.resolve(build_parser().parse_args(args))
            if cfg.credentials:
                from .credentials import read_file

                read_file(cfg.credentials)
            return 0
    except UsageError as exc:
        return _fail(exc)
    return cachefs_main(args)


if __name__ == "__main__":
    sys.exit(main())

