"""Options of ``cachefs mount``: one table, read from the command line, the environment
(``CACHEFS_<NAME>``) and a TOML file (``--config``), in that order of precedence.

Each value is validated here, so a bad one is one clear line and exit code 2 before anything
starts. Credentials are not options (see README, "Credentials").
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(text: str | int) -> int:
    """'200G' -> bytes; K/M/G/T/P are powers of 1024 (an optional 'B' or 'iB' is accepted)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 500M, 200G, 1T)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Fraction:
    """A cache size given as a share of the cache dir's filesystem ("90%")."""

    share: float

    def of(self, total: int) -> int:
        return int(total * self.share)

    def __str__(self) -> str:
        return f"{self.share * 100:g}%"


def parse_cache_size(text: str | int) -> int | Fraction:
    """A size ('200G') or a percentage of the cache dir's filesystem ('90%')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*%\s*", str(text))
    if m:
        share = float(m.group(1)) / 100
        if not 0 < share <= 1:
            raise ValueError(f"a percentage of the disk must be in (0, 100]: {text!r}")
        return Fraction(share)
    return parse_size(text)


def parse_duration(text: str | int | float) -> float:
    """'1h' -> 3600.0; a plain number is seconds."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if text < 0:
            raise ValueError("must not be negative")
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (use seconds, or e.g. 30m, 1h, 1d)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def parse_timeout(text: str | int | float) -> float:
    """A duration that must be more than zero (a zero deadline would fail every request)."""
    value = parse_duration(text)
    if value <= 0:
        raise ValueError("must be more than 0 seconds")
    return value


def parse_host_port(text: str) -> str:
    """``[HOST:]PORT``, checked here so that a typo fails before anything is mounted."""
    from .http import parse_addr

    try:
        parse_addr(str(text))
    except UsageError as exc:
        raise ValueError(str(exc).removeprefix("--metrics-addr ")) from None
    return str(text)


def parse_http_url(text: str) -> str:
    """An http:// or https:// URL with a host (the cache tier's S3 endpoint)."""
    from urllib.parse import urlsplit

    text = str(text).strip()
    parts = urlsplit(text)
    if "@" in parts.netloc or parts.query:  # not echoed: it may hold a secret
        raise ValueError("credentials or a query do not belong in the URL; the tier's credentials "
                         "come from CACHEFS_TIER_ACCESS_KEY_ID / CACHEFS_TIER_SECRET_ACCESS_KEY")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL: {text!r}")
    return text.rstrip("/")


def parse_mode(text: str | int) -> int:
    """Permission bits in octal ("0444", "444"). A number from the config file is refused:
    TOML reads ``file_mode = 444`` as decimal 444, which is the mode 0674."""
    if not isinstance(text, str):
        raise ValueError(f'write the mode as an octal string, e.g. "0444", not the number {text!r}')
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"mode out of range: {text!r}")
    return mode


def _whole(text: str | int) -> int:
    """An integer; a TOML float or boolean is refused rather than truncated (uid = 1.5, true)."""
    if isinstance(text, bool | float):
        raise ValueError(f"not a whole number: {text!r}")
    return int(text)


def parse_uint(text: str | int) -> int:
    value = _whole(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def parse_positive(text: str | int) -> int:
    value = _whole(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _choice(*values: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in values:
            raise ValueError(f"must be one of {', '.join(values)}, not {text!r}")
        return text

    return parse


@dataclass(frozen=True)
class Option:
    name: str  # the long option without dashes, with "-"
    parse: Callable[[Any], Any]
    default: Any
    help: str
    flag: bool = False  # a switch without a value
    metavar: str | None = None

    @property
    def key(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: list[Option] = [
    Option("cache-dir", str, "/var/cache/cachefs", "data cache and LMDB listing (one namespace per source)",
           metavar="DIR"),
    Option("cache-size", parse_cache_size, "10G",
           "capacity of the data cache, e.g. 500M, 200G, or 90%% of the cache dir's filesystem",
           metavar="SIZE"),
    Option("cache-policy", _choice("stable", "lru"), "stable",
           "stable: keep a fixed subset when full (best for shuffled epochs); lru: evict least recently used"),
    Option("cache-idle-evict", parse_duration, 86400.0,
           "under 'stable', data unused this long may be evicted for new data", metavar="SECONDS"),
    Option("reclaim-after", parse_duration, 604800.0,
           "when the cache disk needs room, delete other cache namespaces unused this long",
           metavar="SECONDS"),
    Option("metadata-ttl", parse_duration, 86400.0,
           "re-check listings and attributes after this long (0 = every time)", metavar="SECONDS"),
    Option("endpoint-url", str, None,
           "S3/COS endpoint, e.g. https://s3.us-south.cloud-object-storage.appdomain.cloud", metavar="URL"),
    Option("region", str, None, "S3 region", metavar="NAME"),
    Option("profile", str, None, "AWS shared-credentials profile", metavar="NAME"),
    Option("account", str, None, "Azure storage account (default $AZURE_STORAGE_ACCOUNT)", metavar="NAME"),
    Option("credentials", str, None,
           "read credentials from FILE: NAME=value lines of the variables the environment would carry "
           "(AWS_*, AZURE_*, IBM_*); for fstab and systemd mounts", metavar="FILE"),
    Option("tier-endpoint-url", parse_http_url, None,
           "S3 endpoint of a cluster-shared cache tier (SeaweedFS remote-mounting the bucket): block "
           "downloads go there first, the origin serves listings and whatever the tier misses", metavar="URL"),
    Option("tier-bucket", str, None, "bucket of the tier holding the source (default: the source's bucket "
           "or container name)", metavar="NAME"),
    Option("tier-timeout", parse_timeout, 10.0,
           "a tier GET without an answer after this is read from the origin (and the tier skipped for 10 s)",
           metavar="SECONDS"),
    Option("foreground", parse_bool, False, "stay attached (containers, systemd)", flag=True),
    Option("prefetch", parse_bool, False, "prefetch everything mounted into the cache at start",
           flag=True),
    Option("prefetch-concurrency", parse_positive, 64, "requests in flight for prefetch", metavar="N"),
    Option("ready-after-prefetch", parse_bool, False, "/readyz answers 200 only after the prefetch finished",
           flag=True),
    Option("metrics-addr", parse_host_port, None,
           "serve /metrics, /healthz, /readyz on [HOST:]PORT (host defaults to 127.0.0.1)", metavar="[HOST:]PORT"),
    Option("backend-timeout", parse_timeout, 60.0, "a read that cannot reach the backend fails with EIO after this",
           metavar="SECONDS"),
    Option("log-level", _choice("debug", "info", "warning", "error"), "info", "log verbosity"),
    Option("log-format", _choice("text", "json"), "text", "json: one JSON object per line"),
    Option("allow-other", parse_bool, False, "let other users see the mount (implies default_permissions)", flag=True),
    Option("uid", parse_uint, None, "owner shown for files (default: the mounting user)", metavar="N"),
    Option("gid", parse_uint, None, "group shown for files (default: the mounting user's)", metavar="N"),
    Option("file-mode", parse_mode, None,
           "permission bits shown for files (default: 0444, 0644 with --read-write)", metavar="OCTAL"),
    Option("dir-mode", parse_mode, None,
           "permission bits shown for directories (default: 0555, 0755 with --read-write)", metavar="OCTAL"),
    Option("noexec", parse_bool, False, "files in the mount cannot be executed", flag=True),
    Option("control-group", parse_uint, None,
           "members of this group (and root, and the daemon's user) may use the control socket: "
           "cachefs prefetch/status and cachefs.client from a non-root trainer", metavar="GID"),
    Option("control-socket", str, None,
           "put the control socket here (e.g. beside the mountpoint on a path the trainer's pod "
           "shares) instead of in the cache dir", metavar="PATH"),
    Option("read-write", parse_bool, False,
           "allow writes: files are staged in the cache dir and uploaded at close/fsync", flag=True),
    Option("writeback-interval", parse_duration, 30.0,
           "with --read-write, upload files kept open for writing this often (0 = only at close)",
           metavar="SECONDS"),
    Option("rename-dir-limit", parse_positive, 1000,
           "with --read-write, rename a directory of at most this many objects (larger: EXDEV)",
           metavar="N"),
]
BY_KEY = {opt.key: opt for opt in OPTIONS}


@dataclass
class MountConfig:
    source: str
    mountpoint: str
    values: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?",
                        help="s3://BUCKET[/PREFIX], cos://..., az://CONTAINER[/PREFIX], "
                        "wasbs://CONTAINER@ACCOUNT.blob.core.windows.net/PREFIX, "
                        "https://ACCOUNT.blob.core.windows.net/CONTAINER, file:///DIR")
    parser.add_argument("mountpoint", nargs="?", help="an existing empty directory")
    parser.add_argument("--config", metavar="FILE", help="TOML file with these options (default $CACHEFS_CONFIG)")
    for opt in OPTIONS:
        default = opt.default
        shown = "" if default in (None, False) else f" (default: {default})"
        if opt.flag:
            parser.add_argument(f"--{opt.name}", action="store_const", const=True, default=None,
                                help=opt.help + shown)
        else:
            parser.add_argument(f"--{opt.name}", default=None, metavar=opt.metavar, help=opt.help + shown)


def _parse(opt: Option, raw: Any, where: str) -> Any:
    try:
        return opt.parse(raw)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: invalid value for {opt.name}: {exc}") from None


def resolve(args: argparse.Namespace, environ: dict[str, str] | None = None) -> MountConfig:
    """Merge command line > environment > config file > defaults into a MountConfig."""
    env = dict(os.environ if environ is None else environ)
    file_values: dict[str, Any] = {}
    config_path = args.config or env.get("CACHEFS_CONFIG")
    if config_path:
        try:
            with open(config_path, "rb") as f:
                file_values = tomllib.load(f)
        except FileNotFoundError:
            raise UsageError(f"config file {config_path} does not exist") from None
        except OSError as exc:
            raise UsageError(f"cannot read config file {config_path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"config file {config_path}: {exc}") from None
        unknown = set(file_values) - set(BY_KEY) - {"source", "mountpoint"}
        if unknown:
            raise UsageError(f"config file {config_path}: unknown option {sorted(unknown)[0]!r}")
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        cli = getattr(args, opt.key, None)
        env_name = "CACHEFS_" + opt.key.upper()
        if cli is not None:
            values[opt.key] = _parse(opt, cli, f"--{opt.name}")
        elif env.get(env_name, "") != "":
            values[opt.key] = _parse(opt, env[env_name], env_name)
        elif opt.key in file_values:
            values[opt.key] = _parse(opt, file_values[opt.key], str(config_path))
        else:
            values[opt.key] = opt.parse(opt.default) if opt.default is not None else None
    source = args.source or env.get("CACHEFS_SOURCE") or file_values.get("source")
    mountpoint = args.mountpoint or env.get("CACHEFS_MOUNTPOINT") or file_values.get("mountpoint")
    if not source:
        raise UsageError("missing SOURCE (e.g. s3://bucket/prefix); see cachefs mount --help")
    if not mountpoint:
        raise UsageError("missing MOUNTPOINT; see cachefs mount --help")
    if isinstance(values["cache_size"], int) and values["cache_size"] <= 0:
        raise UsageError("--cache-size must be larger than 0")
    # The daemon changes to / when it detaches: relative paths must be resolved here.
    values["cache_dir"] = os.path.abspath(values["cache_dir"])
    if values["credentials"]:
        values["credentials"] = os.path.abspath(values["credentials"])
    return MountConfig(str(source), os.path.abspath(str(mountpoint)), values)
