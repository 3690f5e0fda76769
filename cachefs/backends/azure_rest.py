"""A lean client for two Blob REST calls: List Blobs, which the SDK makes too expensive, and the
GET of a key obstore cannot express.

azure-storage-blob spends 250-420 ms of CPU (and of GIL, which FUSE requests then wait for) per
1,000 blobs listed, nearly all of it in its generic XML deserializer. This client sends the same
request through azure-core's public pipeline (the SDK's own HTTP stack: proxies from the
environment, connection pooling, TLS) and reads the answer with ``xmlscan``: ~9 ms per 1,000
blobs (bench/get_cpu.py). It also makes the GETs of keys obstore's paths cannot hold
("a//b", a leading or trailing "/"), with exactly one request each, through public interfaces
only (the SDK's downloader repeats a body cut short by itself, see ``azure.py``).

Authorisation, as the REST API documents it: Shared Key (an account key, signed here), a SAS
(appended to every URL), or a bearer token from an azure-identity credential (azure-core's
``BearerTokenCredentialPolicy``, which caches and refreshes it).
"""

from __future__ import annotations

import base64
import calendar
import email.utils
import hashlib
import hmac
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit
from xml.etree import ElementTree

import requests
from azure.core import PipelineClient
from azure.core.pipeline import PipelineRequest
from azure.core.pipeline.policies import BearerTokenCredentialPolicy, HeadersPolicy, SansIOHTTPPolicy
from azure.core.pipeline.transport import RequestsTransport
from azure.core.rest import HttpRequest, HttpResponse
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from . import xmlscan
from .base import ListPage, ObjectInfo

API_VERSION = "2021-12-02"  # the REST version asked for: Shared Key, SAS and OAuth all accept it
STORAGE_SCOPE = "https://storage.azure.com/.default"
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep",
                                       "Oct", "Nov", "Dec"), 1)}
# Headers of the Shared Key string-to-sign, in its order (after the verb).
_SIGNED_HEADERS = ("content-encoding", "content-language", "content-length", "content-md5", "content-type",
                   "date", "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range")


class StoreError(Exception):
    """A non-2xx answer: its status and the ``x-ms-error-code`` header."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}".strip())
        self.status = status
        self.code = code


def http_date_ts(text: str) -> float:
    """Seconds since the epoch of an RFC 1123 date ("Sun, 29 Nov 2026 22:38:32 GMT"), the form
    List Blobs gives Last-Modified in; ~10x cheaper than ``email.utils``."""
    try:
        day, month, year, clock = text[5:7], _MONTHS[text[8:11]], text[12:16], text[17:25]
        return float(calendar.timegm((int(year), month, int(day), int(clock[0:2]), int(clock[3:5]),
                                      int(clock[6:8]), 0, 0, 0)))
    except (KeyError, ValueError) as exc:
        raise ValueError(f"not an HTTP date: {text!r}") from exc


_LISTING = xmlscan.scanner(("Name", 'Name Encoded="true"', "Last-Modified", "Etag", "Content-Length", "NextMarker"),
                           ("Blob", "BlobPrefix"))
_ITEM_LEAVES = frozenset((b"Name", b'Name Encoded="true"', b"Last-Modified", b"Etag", b"Content-Length"))


def parse_list_blobs(body: bytes) -> ListPage:
    """A List Blobs answer (``EnumerationResults``) as a page: blobs with size, ETag (unquoted)
    and mtime, prefixes, and the next marker. Names the service percent-encoded (``Encoded``,
    for characters XML cannot carry) are decoded. Read by ``xmlscan``, or by ElementTree when
    the page is not of the plain shape it reads."""
    try:
        return _scan_list_blobs(xmlscan.scan(body, b"EnumerationResults", _LISTING))
    except (xmlscan.Unreadable, KeyError):  # KeyError: an item without a name or a time
        return _parse_list_blobs_tree(body)


def _scan_list_blobs(leaves: list[tuple[bytes, bytes]]) -> ListPage:
    page = ListPage()
    item: dict[bytes, bytes] = {}
    mtimes: dict[bytes, float] = {}  # a page's blobs share few distinct times
    text = xmlscan.text
    for tag, raw in leaves:
        if tag in _ITEM_LEAVES:  # most leaves: tested first
            item[tag] = raw
        elif tag == b"/Blob":
            modified = item[b"Last-Modified"]
            mtime = mtimes.get(modified)
            if mtime is None:
                mtime = mtimes[modified] = http_date_ts(modified.decode())
            page.objects.append(ObjectInfo(_name(item), int(item.get(b"Content-Length") or 0),
                                           text(item.get(b"Etag", b"")).strip('"'), mtime))
            item = {}
        elif tag == b"/BlobPrefix":
            page.prefixes.append(_name(item))
            item = {}
        elif tag == b"NextMarker":
            page.token = text(raw) or None
    return page


def _name(item: dict[bytes, bytes]) -> str:
    raw = item.get(b"Name")
    if raw is not None:
        return xmlscan.text(raw)
    return unquote(xmlscan.text(item[b'Name Encoded="true"']))  # what XML cannot carry


def _parse_list_blobs_tree(body: bytes) -> ListPage:
    """``parse_list_blobs`` through ElementTree, for a page the scanner does not read."""
    root = ElementTree.fromstring(body)
    page = ListPage()
    mtimes: dict[str, float] = {}  # a page's blobs share few distinct times
    blobs = root.find("Blobs")
    if blobs is not None:
        for node in blobs:
            name_node = node.find("Name")
            name = (name_node.text or "") if name_node is not None else ""
            if name_node is not None and name_node.get("Encoded") == "true":
                name = unquote(name)
            if node.tag == "BlobPrefix":
                page.prefixes.append(name)
                continue
            props = node.find("Properties")
            if props is None:
                continue
            modified = props.findtext("Last-Modified") or ""
            mtime = mtimes.get(modified)
            if mtime is None:
                mtime = mtimes[modified] = http_date_ts(modified)
            page.objects.append(ObjectInfo(name, int(props.findtext("Content-Length") or 0),
                                           (props.findtext("Etag") or "").strip('"'), mtime))
    page.token = root.findtext("NextMarker") or None
    return page


class SharedKeyPolicy(SansIOHTTPPolicy[HttpRequest, HttpResponse]):
    """Signs each request with the account key (the Shared Key scheme of the Blob REST API)."""

    def __init__(self, account: str, key: str) -> None:
        self.account = account
        self.key = base64.b64decode(key)

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        http = request.http_request
        http.headers["x-ms-date"] = _now_http_date()
        headers = {k.lower(): v for k, v in http.headers.items()}
        if headers.get("content-length") == "0":
            headers["content-length"] = ""
        url = urlsplit(http.url)
        lines = [http.method.upper(), *(headers.get(h, "") for h in _SIGNED_HEADERS)]
        lines += [f"{k}:{v.strip()}" for k, v in sorted(headers.items()) if k.startswith("x-ms-")]
        resource = f"/{self.account}{url.path or '/'}"
        params: dict[str, list[str]] = {}
        for k, v in parse_qsl(url.query, keep_blank_values=True):
            params.setdefault(k.lower(), []).append(v)
        resource += "".join(f"\n{k}:{','.join(sorted(v))}" for k, v in sorted(params.items()))
        lines.append(resource)
        digest = hmac.new(self.key, "\n".join(lines).encode(), hashlib.sha256).digest()
        http.headers["Authorization"] = f"SharedKey {self.account}:{base64.b64encode(digest).decode()}"


def _now_http_date() -> str:
    return email.utils.formatdate(usegmt=True)


class BlobRest:
    """List Blobs and ranged GETs of one container. Exactly one HTTP request per call, no retries
    (``retry.py`` owns them); non-2xx answers raise ``StoreError``, network failures azure-core's
    ``ServiceRequestError`` / ``ServiceResponseError``."""

    def __init__(self, endpoint: str, account: str, container: str, *, key: str | None = None,
                 sas: str | None = None, credential: Any = None, max_connections: int = 128,
                 connect_timeout: float = 5, read_timeout: float = 30) -> None:
        self.base = endpoint.split("?")[0].rstrip("/") + "/" + quote(container)
        self.sas = (sas or "").lstrip("?")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        policies: list[Any] = [HeadersPolicy({"x-ms-version": API_VERSION})]
        if key:
            policies.append(SharedKeyPolicy(account, key))
        elif credential is not None and not self.sas:
            policies.append(BearerTokenCredentialPolicy(credential, STORAGE_SCOPE))
        session = requests.Session()
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max_connections,
                              max_retries=Retry(total=False, redirect=False, raise_on_status=False))
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        transport = RequestsTransport(session=session, session_owner=True)
        self.client: PipelineClient[HttpRequest, HttpResponse] = PipelineClient(
            self.base, policies=policies, transport=transport)

    def _url(self, path: str, query: dict[str, str]) -> str:
        q = urlencode(query, quote_via=quote)
        if self.sas:
            q = f"{q}&{self.sas}" if q else self.sas
        return f"{self.base}{path}" + (f"?{q}" if q else "")

    def _send(self, request: HttpRequest) -> HttpResponse:
        resp = self.client.send_request(request, connection_timeout=self.connect_timeout,
                                        read_timeout=self.read_timeout)
        if resp.status_code >= 300:
            code = resp.headers.get("x-ms-error-code", "")
            resp.close()
            raise StoreError(resp.status_code, code)
        return resp

    def list_page(self, prefix: str, delimiter: str | None, marker: str | None,
                  page_size: int) -> ListPage:
        query = {"restype": "container", "comp": "list", "maxresults": str(page_size)}
        if prefix:
            query["prefix"] = prefix
        if delimiter:
            query["delimiter"] = delimiter
        if marker:
            query["marker"] = marker
        resp = self._send(HttpRequest("GET", self._url("", query)))
        return parse_list_blobs(resp.read())

    def get(self, key: str, start: int, length: int, etag: str | None) -> tuple[bytes, str | None]:
        """``length`` bytes of ``key`` from ``start`` (If-Match ``etag``), and the answer's ETag."""
        headers = {"x-ms-range": f"bytes={start}-{start + length - 1}"}
        if etag:
            headers["If-Match"] = f'"{etag}"'
        resp = self._send(HttpRequest("GET", self._url("/" + quote(key, safe="/~"), {}), headers=headers))
        return resp.read(), resp.headers.get("ETag")

    def close(self) -> None:
        self.client.close()

