"""One ranged GET through obstore, with cachefs's errors: the data path of S3 and Azure.

obstore (Rust ``object_store``) makes the request without the GIL and at a fraction of the CPU of
boto3 or azure-storage-blob. Its stores are built with no retries of their own (``retry.py`` owns
them) and the backend's timeouts.
"""

from __future__ import annotations

import os
import re
from typing import Any

from ..errors import (
    AccessDenied,
    BackendError,
    NotFound,
    ObjectChanged,
    TemporaryFailure,
    UsageError,
    temporary_status,
)

# obstore reports an HTTP error as text: "... Server returned non-2xx status code: 501 Not ..."
_STATUS = re.compile(r"status code: (\d{3})")


def root_certificate(*env_names: str) -> dict[str, Any]:
    """obstore's client option trusting the CA bundle named by the first of ``env_names`` that is
    set (the one the SDK of the store trusts), or no option."""
    path = next((os.environ[n] for n in env_names if os.environ.get(n)), None)
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            return {"root_certificate": f.read()}
    except OSError as exc:
        raise UsageError(f"cannot read the CA bundle {path!r}: {exc.strerror}") from exc


def expressible(key: str) -> bool:
    """Whether obstore's paths can hold ``key`` as it is: they drop a leading or trailing "/"
    (so "a/" would read "a"); empty, "." and ".." segments and control characters are refused
    when the GET is made (``get`` then returns None)."""
    return not (key.startswith("/") or key.endswith("/"))


def get(store: Any, key: str, start: int, length: int, etag: str | None) -> tuple[bytes, str | None] | None:
    """``length`` bytes of ``key`` from ``start``, If-Match ``etag`` when given, and the answer's
    ETag; None for a key obstore cannot express (the caller reads it another way)."""
    import obstore
    from obstore import exceptions as obexc

    if not expressible(key):
        return None
    options: dict[str, Any] = {"range": (start, start + length)}
    if etag:
        options["if_match"] = f'"{etag}"'
    try:
        result = obstore.get(store, key, options=options)  # type: ignore[arg-type]
        return bytes(result.bytes()), result.meta.get("e_tag")
    except (FileNotFoundError, obexc.NotFoundError) as exc:  # obstore raises the built-in one
        raise NotFound(f"get {key!r}: not found") from exc
    except obexc.PreconditionError as exc:
        raise ObjectChanged(f"get {key!r}: object changed") from exc
    except (obexc.PermissionDeniedError, obexc.UnauthenticatedError) as exc:
        raise AccessDenied(f"get {key!r}: access denied") from exc
    except (ValueError, obexc.InvalidPathError):
        return None  # "Could not parse path": not a network error, nothing to retry
    except Exception as exc:  # connection errors, HTTP errors, bodies cut short
        status = _STATUS.search(str(exc))
        if status is not None and not temporary_status(int(status.group(1))):
            raise BackendError(f"get {key!r}: refused by the store ({status.group(1)})") from exc
        raise TemporaryFailure(f"get {key!r}: {type(exc).__name__}") from exc
