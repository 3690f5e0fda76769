"""Logging set-up: text or JSON lines, with credentials scrubbed from every record."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from .errors import redact


class RedactingFilter(logging.Filter):
    """Replaces known secret values and secret-looking key=value pairs in every record."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
        record.msg = redact(msg, self.secrets)
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }, ensure_ascii=False)


redactor = RedactingFilter()


def setup(level: str = "info", fmt: str = "text", path: str | None = None) -> None:
    if path:
        # Private like the rest of the cache dir, whatever the umask (FileHandler would use it).
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        os.chmod(path, 0o600)
    handler: logging.Handler = (logging.FileHandler(path) if path
                                else logging.StreamHandler(sys.stderr))
    handler.addFilter(redactor)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The SDKs log request details (headers, sometimes signed URLs) at debug level; they are
    # redacted anyway, but they drown the daemon's own lines. Azure's HTTP logging policy logs
    # every request and response, headers included, at *info* level: warnings only from it.
    for noisy in ("botocore", "boto3", "urllib3", "azure", "s3transfer"):
        logging.getLogger(noisy).setLevel(max(logging.INFO, root.level))
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
