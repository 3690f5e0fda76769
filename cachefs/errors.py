"""The cachefs exception tree.

Backends raise only these; SDK exceptions are translated at the edge (``raise X from exc``)
so the rest of the daemon never imports boto3 or azure to catch something::

    CachefsError
    ├── UsageError              bad command line / config value          (exit 2)
    ├── MountError              mountpoint or cache dir unusable         (exit 4)
    └── BackendError            anything the object store said           (exit 3)
        ├── NotFound            no such object / bucket / container
        ├── AccessDenied        credentials rejected or missing
        ├── ObjectChanged       the ETag we pinned a read to is gone
        └── TemporaryFailure    worth retrying: 5xx, throttling, resets, short bodies
                                (``temporary_status``); any other refusal is a BackendError
            └── Unreachable     could not connect at all

Messages are for users: one line, never a credential (see ``redact``).
"""

from __future__ import annotations

import re


class CachefsError(Exception):
    """Base of every error cachefs raises on purpose."""

    exit_code = 1


class UsageError(CachefsError):
    exit_code = 2


class MountError(CachefsError):
    exit_code = 4


class BackendError(CachefsError):
    exit_code = 3


class NotFound(BackendError):
    pass


class AccessDenied(BackendError):
    pass


class ObjectChanged(BackendError):
    """The object was replaced while we read it (ETag mismatch, HTTP 412)."""


class TemporaryFailure(BackendError):
    pass


class Unreachable(TemporaryFailure):
    pass


def temporary_status(status: int) -> bool:
    """Whether an HTTP error status is worth retrying: 5xx but "not implemented" and "version not
    supported", 408 (timeout), 409 (a conflicting operation in progress), 429 (throttled).
    Any other 4xx refuses the request itself: the same request would be refused again."""
    if status >= 500:
        return status not in (501, 505)
    return status in (408, 409, 429)


# key=value pairs and URL query strings that look like secrets. Used on every message that
# could carry text from an SDK (which sometimes echoes connection strings or SAS URLs).
_SECRET_PATTERNS = [
    re.compile(r"(?i)(AccountKey|SharedAccessSignature|sig|se|sp|sv|sr|skoid|sktid)=([^;&\s'\"]+)"),
    re.compile(r"(?i)(aws_secret_access_key|secret_key|password|token|apikey|api_key_id)"
               r"(['\"]?\s*[:=]\s*['\"]?)([^\s'\",}]+)"),
    re.compile(r"(?i)(bearer\s+)([^\s'\",}]+)"),  # an Authorization header (IBM IAM tokens)
]


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove anything that looks like a credential, and every known secret value, from text."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _SECRET_PATTERNS[0].sub(lambda m: f"{m.group(1)}=***", text)
    text = _SECRET_PATTERNS[1].sub(lambda m: f"{m.group(1)}{m.group(2)}***", text)
    text = _SECRET_PATTERNS[2].sub(lambda m: f"{m.group(1)}***", text)
    return text
