"""Write constraints.txt: the exact version of every Python package that cachefs and its
[demo] and [test] extras install, as pip resolves them today, except pyfuse3 (built from
third_party/, see install.sh) and cachefs itself. The Dockerfile and install.sh (hence CI)
install with ``-c constraints.txt``, so a rebuild next month gets the same versions.

    .venv/bin/python tools/refresh_constraints.py      # then review the diff and run the tests

It resolves afresh (``pip install --dry-run --ignore-installed --report``): what is installed in
the virtualenv does not matter, the newest versions allowed by pyproject.toml are taken. Resolve
with the Python of the image and of CI (Debian 12: 3.11 on x86_64): environment markers are
evaluated for the running interpreter.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "constraints.txt"
EXCLUDED = {"cachefs", "pyfuse3"}
TARGET = "[demo,test]"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve() -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                              "--disable-pip-version-check", "--report", str(report), f"{REPO}{TARGET}"],
                             capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"refresh_constraints: pip could not resolve {TARGET}:\n{res.stderr}")
        items = json.loads(report.read_text())["install"]
    pins = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in items}
    return {name: version for name, version in sorted(pins.items()) if name not in EXCLUDED}


def main() -> None:
    pins = resolve()
    python = ".".join(platform.python_version_tuple()[:2])
    lines = [
        "# Exact versions of the Python packages cachefs installs (runtime, [demo] and [test]), for the",
        "# Dockerfile and install.sh (pip install -c constraints.txt). pyfuse3 is not here: it is built",
        "# from third_party/. Generated; refresh with:",
        "#     .venv/bin/python tools/refresh_constraints.py",
        f"# Resolved for Python {python} on {platform.system()} {platform.machine()}.",
        *(f"{name}=={version}" for name, version in pins.items()),
    ]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"{OUT.relative_to(REPO)}: {len(pins)} packages")


if __name__ == "__main__":
    main()
