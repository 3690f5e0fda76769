"""Where credentials come from besides the process environment: files.

- ``env_secret(NAME)``: ``$NAME``, or the contents of the file named by ``$NAME_FILE`` (the shape
  of a Kubernetes Secret mounted as a volume);
- ``apply_file(PATH)``: a credentials file (``--credentials`` / ``-o credentials=``, for fstab
  and systemd mounts, which have no environment to speak of): ``NAME=value`` lines of the same
  variables the environment would carry (``AWS_*``, ``AZURE_*``, ``IBM_*``), set in this process's
  environment, over what it had. Blank lines and ``#`` comments are skipped; ``export NAME=value``
  and a value in matching quotes are accepted (a shell or systemd ``EnvironmentFile`` can read
  the same file). The file must not be readable by other users.

Errors name the file and the line number, never a value.
"""

from __future__ import annotations

import os
import re
import stat

from .errors import UsageError

_NAME = re.compile(r"(?:AWS|AZURE|IBM)_[A-Z0-9_]+")


def env_secret(name: str) -> str | None:
    """The value of $NAME, or the stripped contents of the file named by $NAME_FILE."""
    value = os.environ.get(name)
    if value:
        return value
    path = os.environ.get(name + "_FILE")
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as exc:
            raise UsageError(f"cannot read {name}_FILE {path!r}: {exc.strerror}") from exc
    return None


def read_file(path: str) -> dict[str, str]:
    """The variables of a credentials file (see the module's docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            mode = os.fstat(f.fileno()).st_mode
            text = f.read()
    except FileNotFoundError:
        raise UsageError(f"credentials file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read credentials file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"credentials file {path} is not UTF-8 text") from None
    if not stat.S_ISREG(mode):
        raise UsageError(f"credentials file {path} is not a regular file")
    if mode & stat.S_IROTH:
        raise UsageError(f"credentials file {path} is readable by other users; chmod o-r (or 600) it")
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, eq, value = line.removeprefix("export ").partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not _NAME.fullmatch(name):
            raise UsageError(f"credentials file {path}, line {number}: expected NAME=value with a name "
                             "starting AWS_, AZURE_ or IBM_")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    if not values:
        raise UsageError(f"credentials file {path} sets no variables")
    return values


def apply_file(path: str) -> None:
    """Set the variables of credentials file ``path`` in this process's environment."""
    os.environ.update(read_file(path))
