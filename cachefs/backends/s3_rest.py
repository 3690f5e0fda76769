"""ListObjectsV2 without botocore's client stack: one signed HTTP request per listing page.

botocore spends ~1.5 ms of CPU (and of GIL) on every request before and after the network:
endpoint rules, a dozen event hooks, parameter validation and serialisation, signing, and its
response parsing stack. A listing page is one GET with a few query parameters, so this client
sends it itself: the query built here, SigV4-signed by botocore's own ``S3SigV4Auth`` with the
session's credentials (frozen per page, so refreshable ones are refreshed when they expire) or
authorised with the IBM IAM bearer token of the moment, over a pooled urllib3 connection. The
page's body goes back to ``s3._parse_listing``.

Where to send it is learnt from botocore, not re-derived: ``S3Backend`` lets botocore make one
listing request (the mount's bucket check, or the first page) and keeps the URL, signing region
and signing name botocore used (its endpoint rules: addressing style, FIPS/dual-stack settings,
a bucket in another region after its redirect). Trust and proxies are botocore's too:
``ca_bundle`` (``AWS_CA_BUNDLE``) or its default bundle, the proxy environment variables.

One request per call, no retries (``retry.py`` owns them), no redirects followed: a non-2xx
answer raises ``StoreError`` with the S3 error code, and the bucket's region when the store says
it is elsewhere (the backend then asks botocore again).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import urllib3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.httpsession import get_cert_path
from botocore.utils import get_environ_proxies

_CODE = re.compile(rb"<Code>([^<]*)</Code>")
# What SigV4's canonical query leaves unencoded (RFC 3986 unreserved); the query is sent as signed.
_SAFE = "-_.~"
USER_AGENT = "cachefs (s3_rest)"


class StoreError(Exception):
    """A non-2xx answer: its status, the S3 error code (or ""), and the bucket's region when
    the store named it (``x-amz-bucket-region``)."""

    def __init__(self, status: int, code: str, region: str | None = None) -> None:
        super().__init__(f"HTTP {status} {code}".strip())
        self.status = status
        self.code = code
        self.region = region


@dataclass(frozen=True)
class Endpoint:
    """Where botocore sent a listing of the bucket: the URL without its query, and how it signed."""

    url: str
    region: str
    signing_name: str = "s3"


class S3Rest:
    """ListObjectsV2 pages of one bucket. ``credentials`` (botocore's, possibly refreshable) sign
    each request; with ``bearer`` (a callable giving the headers of the moment) requests are
    unsigned and carry those headers instead."""

    def __init__(self, endpoint: Endpoint, *, credentials: Any = None,
                 bearer: Callable[[], dict[str, str]] | None = None, ca_bundle: str | None = None,
                 max_connections: int = 10, connect_timeout: float = 5, read_timeout: float = 30) -> None:
        self.endpoint = endpoint
        self.credentials = credentials
        self.bearer = bearer
        self.timeout = urllib3.Timeout(connect=connect_timeout, read=read_timeout)
        pool: dict[str, Any] = {"num_pools": 2, "maxsize": max_connections, "retries": False,
                                "timeout": self.timeout}
        if urlsplit(endpoint.url).scheme == "https":
            pool.update(cert_reqs="CERT_REQUIRED", ca_certs=get_cert_path(ca_bundle or True))
        proxy = get_environ_proxies(endpoint.url).get(urlsplit(endpoint.url).scheme)
        self.http: urllib3.PoolManager = (urllib3.ProxyManager(proxy, **pool) if proxy
                                          else urllib3.PoolManager(**pool))

    def list_objects(self, prefix: str, delimiter: str | None, token: str | None, max_keys: int) -> bytes:
        """The body of one ListObjectsV2 page (keys URL-encoded: ``encoding-type=url``)."""
        params = {"list-type": "2", "encoding-type": "url", "max-keys": str(max_keys), "prefix": prefix}
        if delimiter:
            params["delimiter"] = delimiter
        if token:
            params["continuation-token"] = token
        query = "&".join(f"{k}={quote(v, safe=_SAFE)}" for k, v in sorted(params.items()))
        url = f"{self.endpoint.url}?{query}"
        resp = self.http.request("GET", url, headers=self._authorization(url), redirect=False,
                                 preload_content=True, retries=False, timeout=self.timeout)
        if resp.status >= 300:
            match = _CODE.search(resp.data or b"")
            raise StoreError(resp.status, match.group(1).decode(errors="replace") if match else "",
                             resp.headers.get("x-amz-bucket-region"))
        return resp.data

    def _authorization(self, url: str) -> dict[str, str]:
        if self.bearer is not None:
            return {"User-Agent": USER_AGENT, **self.bearer()}
        request = AWSRequest(method="GET", url=url, headers={"User-Agent": USER_AGENT})
        # Frozen per request: a refreshable source (a role, IRSA) is refreshed when it expires.
        frozen = self.credentials.get_frozen_credentials() if self.credentials is not None else None
        S3SigV4Auth(frozen, self.endpoint.signing_name, self.endpoint.region).add_auth(request)
        return dict(request.headers.items())

    def close(self) -> None:
        self.http.clear()
