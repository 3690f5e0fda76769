"""Parse a SOURCE argument into a backend description.

Accepted forms (see README):
  s3://BUCKET[/PREFIX]        cos://BUCKET[/PREFIX] (an endpoint is required)
  az://CONTAINER[/PREFIX]     wasb[s]://CONTAINER@ACCOUNT.blob.core.windows.net[/PREFIX]
  https://ACCOUNT.blob.core.windows.net/CONTAINER[/PREFIX]
  file:///DIR

The prefix is normalised to either "" or "some/prefix/" so that keys are prefix + relative path.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from .errors import UsageError

# S3 bucket names: 3-63 chars of lower-case letters, digits, dots and hyphens. IBM COS follows
# the same rule. Azure containers: 3-63 chars, lower-case letters, digits and single hyphens.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,62}$")
_CONTAINER_RE = re.compile(r"^(\$root|[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62})$")
_AZURE_HOST_RE = re.compile(r"^([a-z0-9]{3,24})\.blob\.core\.windows\.net$")


@dataclass(frozen=True)
class Source:
    kind: str  # "s3", "azure" or "file"
    bucket: str  # bucket, container, or the directory for file://
    prefix: str  # "" or ends with "/"
    account: str | None = None  # Azure storage account when the URL names it
    url: str = ""  # the normalised URL, used for the cache namespace

    def namespace(self, endpoint: str | None = None) -> str:
        """Directory name under the cache dir: readable, unique per source URL (+ endpoint)."""
        ident = self.url + "|" + (endpoint or "")
        digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
        readable = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{self.kind}-{self.bucket}")[:48]
        return f"{readable}-{digest}"


def _prefix(path: str) -> str:
    path = path.strip("/")
    return path + "/" if path else ""


def parse_source(text: str, *, endpoint_url: str | None = None, account: str | None = None) -> Source:
    """Turn SOURCE into a Source, or raise UsageError with one line saying what is wrong."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("s3", "cos"):
        if scheme == "cos" and not endpoint_url:
            raise UsageError("cos:// sources need --endpoint-url (e.g. https://s3.us-south.cloud-object-storage.appdomain.cloud)")
        bucket = parts.netloc
        if not _BUCKET_RE.match(bucket):
            raise UsageError(f"invalid bucket name {bucket!r} in {text!r}")
        prefix = _prefix(unquote(parts.path))
        return Source("s3", bucket, prefix, url=f"s3://{bucket}/{prefix}")
    if scheme == "az":
        container = parts.netloc
        if not _CONTAINER_RE.match(container):
            raise UsageError(f"invalid container name {container!r} in {text!r}")
        prefix = _prefix(unquote(parts.path))
        acct = account
        return Source("azure", container, prefix, account=acct,
                      url=f"az://{acct or ''}/{container}/{prefix}")
    if scheme in ("wasb", "wasbs"):
        if "@" not in parts.netloc:
            raise UsageError(f"{scheme}:// sources look like {scheme}://CONTAINER@ACCOUNT.blob.core.windows.net/PREFIX")
        container, host = parts.netloc.split("@", 1)
        m = _AZURE_HOST_RE.match(host.lower())
        if not m:
            raise UsageError(f"unrecognised Azure host {host!r} in {text!r}")
        if not _CONTAINER_RE.match(container):
            raise UsageError(f"invalid container name {container!r} in {text!r}")
        prefix = _prefix(unquote(parts.path))
        return Source("azure", container, prefix, account=m.group(1),
                      url=f"az://{m.group(1)}/{container}/{prefix}")
    if scheme == "https" and _AZURE_HOST_RE.match(parts.netloc.lower()):
        acct = _AZURE_HOST_RE.match(parts.netloc.lower()).group(1)  # type: ignore[union-attr]
        path = unquote(parts.path).lstrip("/")
        container, _, rest = path.partition("/")
        if not _CONTAINER_RE.match(container):
            raise UsageError(f"missing or invalid container in {text!r}")
        prefix = _prefix(rest)
        return Source("azure", container, prefix, account=acct,
                      url=f"az://{acct}/{container}/{prefix}")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UsageError(f"file:// sources must be absolute: file:///DIR, not {text!r}")
        directory = unquote(parts.path)
        if not directory.startswith("/"):
            raise UsageError(f"file:// sources must be absolute: file:///DIR, not {text!r}")
        directory = directory.rstrip("/") or "/"
        return Source("file", directory, "", url=f"file://{directory}")
    if not scheme:
        raise UsageError(f"source {text!r} has no scheme; use s3://, cos://, az://, wasbs://, https:// or file://")
    raise UsageError(f"unknown source scheme {scheme!r} in {text!r}; use s3://, cos://, az://, wasb(s)://, https:// or file://")
