"""Object-store backends behind one small async interface (see ``base``)."""

from __future__ import annotations

from ..errors import UsageError
from ..source import Source
from .base import Backend, ListPage, ObjectInfo

__all__ = ["Backend", "ListPage", "ObjectInfo", "create_backend"]


def create_backend(source: Source, *, endpoint_url: str | None = None, region: str | None = None,
                   profile: str | None = None, account: str | None = None,
                   timeout: float = 60.0, max_connections: int = 128) -> Backend:
    """Build the backend for a parsed source. Credentials come from the environment only."""
    if source.kind == "s3":
        from .s3 import S3Backend

        return S3Backend(source, endpoint_url=endpoint_url, region=region, profile=profile,
                         timeout=timeout, max_connections=max_connections)
    if source.kind == "azure":
        from .azure import AzureBackend

        return AzureBackend(source, account=account or source.account, endpoint_url=endpoint_url,
                            timeout=timeout, max_connections=max_connections)
    if source.kind == "file":
        from .local import LocalBackend

        return LocalBackend(source, timeout=timeout, max_connections=max_connections)
    raise UsageError(f"no backend for {source.kind}")
