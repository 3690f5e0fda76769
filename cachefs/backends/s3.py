"""S3 and IBM COS (any S3-compatible store via an endpoint URL).

boto3 resolves credentials with the standard AWS chain (environment, shared files and profiles,
IRSA web identity, instance roles) and does HEAD and writes. Listing pages are sent by ``s3_rest``
(one signed request each, without botocore's client stack: ~1.5 ms of CPU less per page) to where
botocore sent the first listing request; ``CACHEFS_S3_LIST_PATH=botocore`` keeps them on botocore
(for comparison). Either way the page is read by ``_parse_listing``. Ranged GETs — the hot path, one per
small file — go through obstore (Rust ``object_store``; releases the GIL) fed with boto3's
credentials: it costs ~10x less CPU per request than botocore, which otherwise caps a daemon at a
few hundred small files per second per core (see bench/RESULTS.md). ``CACHEFS_S3_DATA_PATH=boto3``
switches the GETs back to boto3 (for comparison, or a store obstore cannot talk to).

With an IBM Cloud IAM API key in the environment (``IBM_API_KEY_ID`` or ``IBM_API_KEY_ID_FILE``;
see ``ibm_iam``), which wins over any AWS credentials, every request carries
``Authorization: Bearer TOKEN`` instead of a SigV4 signature: boto3's clients are unsigned and a
``before-sign`` hook adds the current token to each request; obstore's GETs are unsigned
(``skip_signature``) with the token as a default header of a store rebuilt whenever the token
changes (obstore has no hook per request).

No SDK retries its own requests (``retry.py`` owns retries), and path-style addressing is used
with a custom endpoint, which IBM COS, MinIO and SeaweedFS expect.

Writes go through boto3: PutObject and multipart uploads (each body sent with its Content-MD5,
so the store refuses one damaged on the way), CopyObject up to ``MAX_SINGLE_COPY`` and a
multipart copy (UploadPartCopy in ranges, each range its own retried request) above it. A
CompleteMultipartUpload retried after its answer was lost finds the upload gone (NoSuchUpload)
and accepts the object it finds in its place if that is the upload's result.
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import functools
import hashlib
import logging
import operator
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import unquote_plus
from xml.etree import ElementTree

import boto3
import botocore.exceptions
import botocore.handlers
import botocore.session
import botocore.utils
import trio
import urllib3
from botocore.config import Config

from ..errors import (
    AccessDenied,
    BackendError,
    NotFound,
    ObjectChanged,
    TemporaryFailure,
    Unreachable,
    UsageError,
    temporary_status,
)
from ..source import Source
from . import obstore_get, s3_rest, xmlscan
from .base import Backend, ListPage, ObjectInfo
from .ibm_iam import KeyRefused, Tokens, key_from_env

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT = 5  # seconds; an endpoint that does not accept a TCP connection in 5 s is down
READ_TIMEOUT = 30  # seconds without a byte on an open connection

_NOT_FOUND = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden",
           "AccountProblem", "InvalidToken", "ExpiredToken"}
_CHANGED = {"412", "PreconditionFailed"}
# Requests the store refused for what they are, not for the moment they were sent: retrying
# the same request cannot help.
_PERMANENT = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall", "EntityTooLarge", "InvalidRequest",
              "InvalidArgument", "KeyTooLongError", "MalformedXML", "InvalidStorageClass"}


MIN_PART_SIZE = 5 << 20  # S3 refuses smaller parts but for the last one (EntityTooSmall)
MAX_PARTS = 10_000  # parts per multipart upload
MAX_SINGLE_COPY = 5 << 30  # CopyObject copies at most 5 GiB; a larger object is copied in parts
# Ranges of a multipart copy: each is one server-side request (tens of seconds on AWS at most,
# under the backend timeout); COPY_CONCURRENCY of them run at once.
COPY_PART_SIZE = 256 << 20
COPY_CONCURRENCY = 8
# An abort after a failed multipart copy gets this long, even when the caller was cancelled.
ABORT_GRACE = 5.0
_MULTIPART_ETAG = re.compile(r"^[0-9a-f]{32}-(\d+)$")
_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")


def _md5(data: bytes) -> str:
    """Content-MD5 of a body: the store checks it and refuses a body damaged on the way."""
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _etag(value: str) -> str:
    return value.strip('"')


def _date(resp: dict[str, Any]) -> float:
    """The store's clock when it answered (its Date header), for writes whose answer carries no
    LastModified; this host's clock if there is none."""
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return time.time()


def _code(exc: Exception) -> str:
    if isinstance(exc, botocore.exceptions.ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def multipart_etag(tokens: list[str]) -> str | None:
    """The ETag S3 gives the result of a multipart upload of parts with these ETags (MD5 of
    their MD5s, "-" their count), or None when a part's ETag is not an MD5 (e.g. SSE-KMS)."""
    digests = [_etag(t) for t in tokens]
    if not all(_MD5_HEX.match(d) for d in digests):
        return None
    joined = b"".join(bytes.fromhex(d) for d in digests)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(digests)}"


def _timestamp(value: Any) -> datetime:
    """botocore's timestamp parser, with a fast path for the ISO 8601 form S3 lists
    ("2009-10-12T17:50:30.000Z"); other forms (HTTP dates of HEAD) go to botocore."""
    if isinstance(value, str) and len(value) >= 20 and value[10:11] == "T":
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    return botocore.utils.parse_timestamp(value)


_EMPTY_LISTING = (b'<?xml version="1.0" encoding="UTF-8"?>'
                  b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"></ListBucketResult>')


_LISTING = xmlscan.scanner(("Key", "LastModified", "ETag", "Size", "Prefix", "EncodingType", "IsTruncated",
                            "NextContinuationToken"), ("Contents", "CommonPrefixes"))
_ITEM_LEAVES = frozenset((b"Key", b"LastModified", b"ETag", b"Size", b"Prefix"))


# Each store writes the objects of a page alike, in an order of its own (AWS, IBM COS, MinIO,
# moto: Key, LastModified, ETag, Size, StorageClass; SeaweedFS: Key, ETag, Size, StorageClass,
# LastModified). The first object of a page gives the pattern of all: its markup, literally, with
# the text of the four fields read captured and any other text matched. A page is then one C call
# (one match per object) and a few maps: a fraction of walking the leaves one by one
# (``_scan_listing``), which reads any page whose objects do not all have the first one's shape.
_FIELDS = {"Key": r"([^<]*)", "LastModified": r"([^<]*)", "Size": r"([0-9]+)",
           "ETag": r'(?:&quot;|&#34;|")?([^<&"]*)(?:&quot;|&#34;|")?'}  # unquoted
_QUOTES = ("&quot;", "&#34;", '"')
_FIRST_OBJECT = re.compile(r"<Contents>.*?</Contents>", re.S)
_MARKUP = re.compile(r"(<[^>]*>)")
_PREFIX = re.compile(r"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>\s*</CommonPrefixes>")


def _object_pattern(first: str) -> tuple[re.Pattern[str], list[int]] | None:
    """The pattern of objects shaped like ``first`` (an object's markup), and the positions of
    (key, modified, etag, size) among its groups; None if ``first`` lacks one of them."""
    pieces = _MARKUP.split(first)  # text, tag, text, tag, ..., text
    parts, order = [], []
    for i, piece in enumerate(pieces):
        if i % 2:
            parts.append(re.escape(piece))
            continue
        opening = pieces[i - 1][1:-1] if i else ""
        if opening in _FIELDS and pieces[i + 1] == f"</{opening}>":
            if opening in order:
                return None
            quote = next((q for q in _QUOTES if piece.startswith(q) and piece.endswith(q)), None)
            if opening == "ETag" and quote is not None and len(piece) > 2 * len(quote):
                parts.append(f'{re.escape(quote)}([^<&"]*){re.escape(quote)}')  # as the first one is quoted
            else:
                parts.append(_FIELDS[opening])
            order.append(opening)
        elif i and i + 1 < len(pieces) and pieces[i + 1] == f"</{opening}>":
            parts.append("[^<]*")  # another leaf's text (StorageClass, ChecksumAlgorithm, ...)
        elif not piece.strip():
            parts.append(r"\s*")
        else:
            return None  # text between elements: not a listing as the stores write them
    if len(order) != len(_FIELDS):
        return None
    return _compile("".join(parts)), [order.index(n) for n in ("Key", "LastModified", "ETag", "Size")]


@functools.lru_cache(maxsize=16)
def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _objects(doc: str, times: _Times) -> list[ObjectInfo] | None:
    """Every object of ``doc`` (keys as written), or None unless all have the first one's shape."""
    first = _FIRST_OBJECT.search(doc)
    if first is None:
        return [] if "<Contents>" not in doc else None
    shape = _object_pattern(first.group())
    if shape is None:
        return None
    pattern, (k, m, e, s) = shape
    # split, not findall: a flat list of strings (text between objects, then each object's four
    # fields), sliced into columns; no tuple per object for the garbage collector to walk.
    parts = pattern.split(doc)
    if (len(parts) - 1) // 5 != doc.count("<Contents>"):
        return None
    return list(map(_object, zip(parts[1 + k::5], map(int, parts[1 + s::5]), parts[1 + e::5],
                                 map(times.__getitem__, parts[1 + m::5]), strict=True)))


_ODD = re.compile("[&%+]")  # an entity, or (URL-encoded keys) an escape or a space
_FIRST = operator.itemgetter(0)
_object = functools.partial(tuple.__new__, ObjectInfo)  # ObjectInfo(*t) without a Python call


class _Times(dict[str, float]):
    """LastModified text -> seconds; a page's objects share few distinct times."""

    def __missing__(self, value: str) -> float:
        mtime = self[value] = _timestamp(value).timestamp()
        return mtime


def _parse_listing(body: bytes) -> ListPage:
    """A ListObjectsV2 answer, as botocore would give it (keys URL-decoded when the store
    encoded them: both ask for encoding-type=url). Read by one regular expression per page
    where every object has the usual shape, else leaf by leaf by ``xmlscan`` (a fraction of
    ElementTree's CPU), or by ElementTree when the page is not of the plain shape xmlscan reads."""
    try:
        xmlscan.check(body, b"ListBucketResult")
        return _scan_objects(body.decode()) or _scan_listing(_LISTING.findall(body))
    except (xmlscan.Unreadable, KeyError):  # KeyError: an item without a key or a time
        return _parse_listing_tree(body)


def _leaf(doc: str, name: str) -> str | None:
    """The text of the ``name`` leaf of the page ``doc`` (one of the root's own leaves): looked
    for before the first object and after the last one (not across the whole page), then anywhere."""
    tag = f"<{name}>"
    head, tail = doc.find("<Contents>"), doc.rfind("</Contents>")
    start = doc.find(tag, 0, head) if head >= 0 else doc.find(tag)
    if start < 0 and tail >= 0:
        start = doc.find(tag, tail)
        if start < 0:
            start = doc.find(tag)
    if start < 0:
        return None
    start += len(tag)
    return xmlscan.unescape(doc[start:doc.index("<", start)])


def _scan_objects(doc: str) -> ListPage | None:
    """``_parse_listing`` of a page whose every object and prefix has the same shape (else None)."""
    objects = _objects(doc, _Times())
    if objects is None:
        return None
    prefixes = _PREFIX.findall(doc)
    if len(prefixes) != doc.count("<CommonPrefixes>"):
        return None
    url = (_leaf(doc, "EncodingType") or "").strip() == "url"
    keys = "".join(map(_FIRST, objects))
    if "&" in keys or "%" in keys or "+" in keys:  # an entity, or URL-encoded: most pages have none
        objects = [o._replace(key=_key(o.key, url)) if _ODD.search(o.key) else o for o in objects]
    page = ListPage(objects, [_key(p, url) for p in prefixes])
    if (_leaf(doc, "IsTruncated") or "").strip().lower() == "true":
        page.token = _leaf(doc, "NextContinuationToken") or None
    return page


def _key(text: str, url: bool) -> str:
    text = xmlscan.unescape(text)
    return unquote_plus(text) if url else text


def _scan_listing(leaves: list[tuple[bytes, bytes]]) -> ListPage:
    page = ListPage()
    item: dict[bytes, bytes] = {}
    times: dict[bytes, float] = {}  # a page's objects share few distinct times
    text = xmlscan.text
    truncated = url = False
    for tag, raw in leaves:
        if tag in _ITEM_LEAVES:  # most leaves: tested first
            item[tag] = raw
        elif tag == b"/Contents":
            modified = item[b"LastModified"]
            mtime = times.get(modified)
            if mtime is None:
                mtime = times[modified] = _timestamp(modified.decode()).timestamp()
            page.objects.append(ObjectInfo(text(item[b"Key"]), int(item.get(b"Size") or 0),
                                           text(item.get(b"ETag", b"")).strip('"'), mtime))
            item = {}
        elif tag == b"/CommonPrefixes":
            page.prefixes.append(text(item[b"Prefix"]))
            item = {}
        elif tag == b"IsTruncated":
            truncated = raw.strip().lower() == b"true"
        elif tag == b"NextContinuationToken":
            page.token = text(raw) or None
        elif tag == b"EncodingType":
            url = raw.strip() == b"url"
    if not truncated:
        page.token = None
    if url:  # where EncodingType comes in the page is not fixed: decode once it is known
        page.objects = [o._replace(key=unquote_plus(o.key)) if "%" in o.key or "+" in o.key else o
                        for o in page.objects]
        page.prefixes = [unquote_plus(p) for p in page.prefixes]
    return page


def _parse_listing_tree(body: bytes) -> ListPage:
    """``_parse_listing`` through ElementTree, for a page the scanner does not read."""
    root = ElementTree.fromstring(body)
    ns = root.tag[:root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    url = (root.findtext(ns + "EncodingType") or "") == "url"

    def text(node: ElementTree.Element, name: str) -> str:
        value = node.findtext(ns + name) or ""
        return unquote_plus(value) if url else value

    page = ListPage()
    for c in root.iterfind(ns + "Contents"):
        page.objects.append(ObjectInfo(text(c, "Key"), int(c.findtext(ns + "Size") or 0),
                                       (c.findtext(ns + "ETag") or "").strip('"'),
                                       _timestamp(c.findtext(ns + "LastModified")).timestamp()))
    page.prefixes = [text(p, "Prefix") for p in root.iterfind(ns + "CommonPrefixes")]
    if (root.findtext(ns + "IsTruncated") or "").lower() == "true":
        page.token = root.findtext(ns + "NextContinuationToken") or None
    return page


def _refusal(what: str, code: str, status: str) -> BackendError:
    """What an error answer (S3 error code, HTTP status) means for cachefs."""
    if code in _NOT_FOUND or status == "404":
        return NotFound(f"{what}: not found")
    if code in _DENIED or status == "403":
        return AccessDenied(f"{what}: access denied ({code or status})")
    if code in _CHANGED or status == "412":
        return ObjectChanged(f"{what}: object changed")
    if code in _PERMANENT or (status.isdigit() and not temporary_status(int(status))):
        return BackendError(f"{what}: refused by the store ({code or status})")
    return TemporaryFailure(f"{what}: {code or status or 'error'}")


def _check_etag(key: str, want: str | None, got: str | None, if_match: bool) -> None:
    """Without If-Match, a response of another version than the one pinned is a change."""
    if want and not if_match and got is not None and got.strip('"') != want:
        raise ObjectChanged(f"get {key!r}: object changed")


class S3Backend(Backend):
    min_part_size = MIN_PART_SIZE

    def __init__(self, source: Source, *, endpoint_url: str | None, region: str | None,
                 profile: str | None, timeout: float, max_connections: int) -> None:
        super().__init__(source, timeout=timeout, max_connections=max_connections)
        self.endpoint_url = endpoint_url
        try:
            core = botocore.session.get_session()
            # Listing a million keys spent 40% of its CPU in dateutil parsing LastModified.
            core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_timestamp)
            session = boto3.session.Session(botocore_session=core, profile_name=profile, region_name=region)
        except botocore.exceptions.ProfileNotFound as exc:
            raise AccessDenied(f"AWS profile {profile!r} not found") from exc
        iam_key = key_from_env()
        #: IBM IAM bearer tokens, when an API key is configured (else requests are SigV4-signed)
        self.tokens = Tokens(iam_key) if iam_key is not None else None
        config = Config(
            signature_version=botocore.UNSIGNED if self.tokens is not None else None,
            retries={"total_max_attempts": 1},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
            max_pool_connections=max_connections,
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # Only sign what is sent; newer botocore adds CRC checksums some stores reject.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # Listings get a client of their own without botocore's check for an error hidden in a
        # 200 answer (S3 does that for copies and multipart completes, not listings): it parses
        # every listing page a second time, ~15% of a relist's CPU under the GIL.
        self.list_client = session.client("s3", endpoint_url=endpoint_url, config=config)
        check = getattr(botocore.handlers, "_handle_200_error", None)
        if check is not None:
            self.list_client.meta.events.unregister("before-parse.s3.*", check)
        # botocore walks each listing page's XML in Python (~40 ms of CPU and of GIL per 1,000
        # keys, which FUSE requests then wait for); the page is taken from it here, before its
        # parser, and read with ElementTree's C parser in ``_parse_listing`` (~10x less).
        self._listing = threading.local()
        self.list_client.meta.events.register("before-parse.s3.ListObjectsV2", self._take_listing)
        #: "rest" (pages through ``s3_rest`` once botocore showed where to send them) or "botocore"
        self.list_path = os.environ.get("CACHEFS_S3_LIST_PATH", "rest")
        if self.list_path not in ("rest", "botocore"):
            raise UsageError(f"CACHEFS_S3_LIST_PATH must be rest or botocore, not {self.list_path!r}")
        self.rest: s3_rest.S3Rest | None = None
        self._rest_lock = threading.Lock()
        self._ca_bundle = core.get_config_variable("ca_bundle")
        if self.list_path == "rest":
            self.list_client.meta.events.register("before-sign.s3.ListObjectsV2", self._learn_endpoint)
        self._credentials: Any = None
        #: False once the store refused an If-Match GET: versions are checked by response ETag
        self.conditional_get = True
        self.data_path = os.environ.get("CACHEFS_S3_DATA_PATH", "obstore")
        self.store: Any = None
        self._session, self._max_connections = session, max_connections
        if self.tokens is not None:
            for client in (self.client, self.list_client):
                client.meta.events.register("before-sign.s3", self._authorize)
            self.secrets = (self.tokens.key.api_key,)
            self._bearer_lock = threading.Lock()
            self._bearer: tuple[dict[str, str], Any] | None = None  # (headers, obstore store) in use
            return
        creds = self._credentials = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            self.secrets = tuple(s for s in (frozen.secret_key, frozen.token) if s)
        if self.data_path == "obstore" and creds is not None:
            from obstore.auth.boto3 import Boto3CredentialProvider

            self.store = self._obstore(credential_provider=Boto3CredentialProvider(session))

    def _obstore(self, *, credential_provider: Any = None, headers: dict[str, str] | None = None) -> Any:
        """An obstore S3 store signing with ``credential_provider``, or unsigned and sending
        ``headers`` with every request."""
        from obstore.store import S3Store

        endpoint_url = self.endpoint_url
        config: dict[str, Any] = {"region": self._session.region_name or "us-east-1"}
        if endpoint_url:
            config.update(endpoint=endpoint_url, virtual_hosted_style_request=False)
        client_options: dict[str, Any] = {
            "allow_http": bool(endpoint_url and endpoint_url.startswith("http://")),
            "connect_timeout": timedelta(seconds=CONNECT_TIMEOUT),
            "timeout": timedelta(seconds=READ_TIMEOUT),
            "pool_max_idle_per_host": str(self._max_connections),
            **obstore_get.root_certificate("AWS_CA_BUNDLE")}  # what boto3 trusts
        if headers is not None:
            config["skip_signature"] = True
            client_options["default_headers"] = headers
        return S3Store(
            self.source.bucket,
            config=config,  # type: ignore[arg-type]
            client_options=client_options,  # type: ignore[arg-type]
            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
            credential_provider=credential_provider,
        )

    def _authorize(self, request: Any, **kwargs: Any) -> None:
        """botocore hook (IBM IAM): the current bearer token instead of a signature."""
        assert self.tokens is not None
        for name, value in self.tokens.headers().items():
            request.headers[name] = value

    def _data_store(self) -> Any:
        """The obstore store for GETs (None: GETs go through boto3). Under IBM IAM, a store
        carrying the current token, built anew when the token changes."""
        if self.tokens is None or self.data_path != "obstore":
            return self.store
        headers = self.tokens.headers()
        current = self._bearer
        if current is None or current[0] != headers:
            with self._bearer_lock:
                current = self._bearer
                if current is None or current[0] != headers:
                    current = self._bearer = (headers, self._obstore(headers=headers))
        return current[1]

    def translate(self, exc: Exception, what: str) -> BackendError:
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            return _refusal(what, str(err.get("Code", "")),
                            str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")))
        if isinstance(exc, s3_rest.StoreError):
            return _refusal(what, exc.code, str(exc.status))
        if isinstance(exc, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError):
            return Unreachable(f"{what}: cannot connect to {self.endpoint_url or 'S3'}")
        if isinstance(exc, urllib3.exceptions.MaxRetryError):  # urllib3 wraps connection errors in it
            return self.translate(exc.reason, what) if isinstance(exc.reason, Exception) else \
                TemporaryFailure(f"{what}: {type(exc).__name__}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError):
            return AccessDenied(f"{what}: no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or a role)")
        if isinstance(exc, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError):
            return Unreachable(f"{what}: cannot connect to {self.endpoint_url or 'S3'}")
        if isinstance(exc, botocore.exceptions.BotoCoreError | OSError):
            return TemporaryFailure(f"{what}: {type(exc).__name__}")
        return TemporaryFailure(f"{what}: {type(exc).__name__}")

    def _run(self, what: str, fn: Any, **kwargs: Any) -> Any:
        def once() -> Any:
            try:
                return fn(**kwargs)
            except BackendError:
                raise
            except Exception as exc:
                raise self.translate(exc, what) from exc

        return self._token_retry(once)

    def _token_retry(self, call: Callable[[], T]) -> T:
        """``call()``; under IBM IAM, once more with a new token when the store refused the one
        sent (revoked, or expired early by the store's clock). A refusal for what the key may
        not do is refused again and raised."""
        if self.tokens is None:
            return call()
        sent = self.tokens.current
        try:
            return call()
        except KeyRefused:
            raise
        except AccessDenied:
            if sent is None:  # a token fresh from the endpoint
                raise
            self.tokens.expire(sent)
        return call()

    def _check_sync(self) -> None:
        # Through botocore, which also shows the listings where to go (``_learn_endpoint``).
        try:
            self._run(f"bucket {self.source.bucket}", self.list_client.list_objects_v2,
                      Bucket=self.source.bucket, Prefix=self.source.prefix, MaxKeys=1)
        except NotFound as exc:
            raise NotFound(f"bucket {self.source.bucket!r} does not exist") from exc
        finally:
            self._listing.body = None

    def _learn_endpoint(self, request: Any, signature_version: Any = None, region_name: str | None = None,
                        **kwargs: Any) -> None:
        """botocore hook (before a listing request is signed): where and how botocore sends
        listings of the bucket, for ``s3_rest``. Learnt once, and again after a redirect; a
        signature other than SigV4 (or IBM IAM's bearer) leaves listings on botocore."""
        if self.rest is not None:
            return
        if self.tokens is None and signature_version not in ("s3v4", "v4"):
            return
        signing = request.context.get("signing", {})
        endpoint = s3_rest.Endpoint(request.url.split("?", 1)[0], signing.get("region") or region_name or "us-east-1",
                                    signing.get("signing_name") or "s3")
        with self._rest_lock:
            if self.rest is None:
                self.rest = s3_rest.S3Rest(
                    endpoint, credentials=self._credentials,
                    bearer=self.tokens.headers if self.tokens is not None else None,
                    ca_bundle=self._ca_bundle, max_connections=self._max_connections,
                    connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT)

    def _take_listing(self, response_dict: dict[str, Any], **kwargs: Any) -> None:
        """botocore hook: keep a successful listing's body for ``_parse_listing`` and hand
        botocore an empty one to parse (errors are left to botocore)."""
        body = response_dict.get("body")
        if response_dict.get("status_code", 500) < 300 and body:
            self._listing.body = body
            response_dict["body"] = _EMPTY_LISTING

    def _list_sync(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        rest = self.rest
        if rest is None:  # CACHEFS_S3_LIST_PATH=botocore, or botocore has not shown the way yet
            return self._list_botocore(prefix, delimiter, token)
        what = f"list {prefix!r}"

        def once() -> bytes:
            try:
                return rest.list_objects(prefix, delimiter, token, self.page_size)
            except s3_rest.StoreError as exc:
                if exc.region and exc.region != rest.endpoint.region:
                    raise  # the bucket is elsewhere: botocore follows the redirect (below)
                raise self.translate(exc, what) from exc
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise self.translate(exc, what) from exc
            except botocore.exceptions.BotoCoreError as exc:  # no credentials to sign with
                raise self.translate(exc, what) from exc

        try:
            body = self._token_retry(once)
        except s3_rest.StoreError as exc:
            log.info("%s: the bucket is in %s, not %s; asking botocore where to list", self.describe(),
                     exc.region, rest.endpoint.region)
            with self._rest_lock:
                if self.rest is rest:
                    self.rest = None
            rest.close()
            return self._list_botocore(prefix, delimiter, token)
        try:
            return _parse_listing(body)
        except (ElementTree.ParseError, ValueError, TypeError) as exc:
            raise TemporaryFailure(f"{what}: unreadable answer ({type(exc).__name__})") from exc

    def _list_botocore(self, prefix: str, delimiter: str | None, token: str | None) -> ListPage:
        kwargs: dict[str, Any] = {"Bucket": self.source.bucket, "Prefix": prefix,
                                  "MaxKeys": self.page_size}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        self._listing.body = None
        resp = self._run(f"list {prefix!r}", self.list_client.list_objects_v2, **kwargs)
        body, self._listing.body = self._listing.body, None
        if body is not None:
            try:
                return _parse_listing(body)
            except (ElementTree.ParseError, ValueError, TypeError) as exc:
                raise TemporaryFailure(f"list {prefix!r}: unreadable answer ({type(exc).__name__})") from exc
        page = ListPage(
            objects=[ObjectInfo(o["Key"], int(o["Size"]), o.get("ETag", "").strip('"'),
                                o["LastModified"].timestamp()) for o in resp.get("Contents", ())],
            prefixes=[p["Prefix"] for p in resp.get("CommonPrefixes", ())],
            token=resp.get("NextContinuationToken") if resp.get("IsTruncated") else None,
        )
        return page

    def _head_sync(self, key: str) -> ObjectInfo:
        resp = self._run(f"head {key!r}", self.client.head_object, Bucket=self.source.bucket, Key=key)
        return ObjectInfo(key, int(resp["ContentLength"]), resp.get("ETag", "").strip('"'),
                          resp["LastModified"].timestamp())

    def _get_sync(self, key: str, start: int, length: int, etag: str | None) -> bytes:
        if etag and self.conditional_get:
            try:
                return self._get_once(key, start, length, etag, if_match=True)
            except BackendError as exc:
                if type(exc) is not BackendError:  # not found, denied, changed, temporary
                    raise
                # Refused for what it is: a store without conditional GETs (If-Match) says
                # 400 or 501. Read without it, and check each response's ETag instead.
                self._get_once(key, start, min(length, 1), etag, if_match=False)
                self.conditional_get = False
                log.warning("%s refuses conditional GETs (%s); reading without If-Match and "
                            "checking the ETag of every response instead", self.describe(), exc)
        return self._get_once(key, start, length, etag, if_match=False)

    def _get_once(self, key: str, start: int, length: int, etag: str | None, *, if_match: bool) -> bytes:
        """One ranged GET, pinned to ``etag`` with If-Match (``if_match``) or by comparing the
        response's ETag with it."""
        if self._data_store() is not None:
            got = self._token_retry(
                lambda: obstore_get.get(self._data_store(), key, start, length, etag if if_match else None))
            if got is not None:
                data, got_etag = got
                _check_etag(key, etag, got_etag, if_match)
                return data
        kwargs: dict[str, Any] = {"Bucket": self.source.bucket, "Key": key,
                                  "Range": f"bytes={start}-{start + length - 1}"}
        if etag and if_match:
            kwargs["IfMatch"] = f'"{etag}"'
        resp = self._run(f"get {key!r}", self.client.get_object, **kwargs)
        try:
            body = resp["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        except Exception as exc:  # the connection broke mid-body
            raise TemporaryFailure(f"get {key!r}: body interrupted ({type(exc).__name__})") from exc
        _check_etag(key, etag, resp.get("ETag"), if_match)
        return bytes(data)

    # -- writes ---------------------------------------------------------------------------------

    def _put_sync(self, key: str, data: bytes) -> ObjectInfo:
        resp = self._run(f"put {key!r}", self.client.put_object, Bucket=self.source.bucket, Key=key,
                         Body=data, ContentMD5=_md5(data))
        return ObjectInfo(key, len(data), _etag(resp["ETag"]), _date(resp))

    def _start_upload_sync(self, key: str) -> str:
        resp = self._run(f"start upload of {key!r}", self.client.create_multipart_upload,
                         Bucket=self.source.bucket, Key=key)
        return str(resp["UploadId"])

    def _upload_part_sync(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        resp = self._run(f"upload part {number} of {key!r}", self.client.upload_part,
                         Bucket=self.source.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                         Body=data, ContentMD5=_md5(data))
        return str(resp["ETag"])

    def _complete_upload_sync(self, key: str, upload_id: str, parts: list[tuple[int, str]],
                              size: int) -> ObjectInfo:
        what = f"complete upload of {key!r}"
        try:
            resp = self.client.complete_multipart_upload(
                Bucket=self.source.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": token} for n, token in parts]})
        except Exception as exc:
            if _code(exc) != "NoSuchUpload":
                raise self.translate(exc, what) from exc
            return self._completed_before(key, parts, size, what, exc)
        return ObjectInfo(key, size, _etag(resp["ETag"]), _date(resp))

    def _completed_before(self, key: str, parts: list[tuple[int, str]], size: int, what: str,
                          exc: Exception) -> ObjectInfo:
        """The upload is gone: completed by an attempt whose answer was lost, or aborted. The
        object at ``key`` is its result if it has the size (and, where S3's rule for multipart
        ETags applies to both, the ETag) the upload makes."""
        try:
            info = self._head_sync(key)
        except NotFound:
            raise BackendError(f"{what}: no such upload") from exc
        expected = multipart_etag([token for _, token in parts])
        if info.size != size or (expected and _MULTIPART_ETAG.match(info.etag) and info.etag != expected):
            raise BackendError(f"{what}: no such upload, and {key!r} is not its result") from exc
        log.info("%s: already completed (an earlier answer was lost)", what)
        return info

    def _abort_upload_sync(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(NotFound):
            self._run(f"abort upload of {key!r}", self.client.abort_multipart_upload,
                      Bucket=self.source.bucket, Key=key, UploadId=upload_id)

    def _delete_sync(self, key: str) -> None:
        with contextlib.suppress(NotFound):  # S3 answers 204 anyway; some compatible stores 404
            self._run(f"delete {key!r}", self.client.delete_object, Bucket=self.source.bucket, Key=key)

    def _copy_sync(self, src: str, dst: str, size: int) -> ObjectInfo:
        resp = self._run(f"copy {src!r} to {dst!r}", self.client.copy_object, Bucket=self.source.bucket,
                         Key=dst, CopySource={"Bucket": self.source.bucket, "Key": src})
        result = resp["CopyObjectResult"]
        return ObjectInfo(dst, size, _etag(result["ETag"]), result["LastModified"].timestamp())

    def _copy_part_sync(self, src: str, dst: str, upload_id: str, number: int, start: int,
                        length: int) -> str:
        resp = self._run(f"copy part {number} of {src!r} to {dst!r}", self.client.upload_part_copy,
                         Bucket=self.source.bucket, Key=dst, UploadId=upload_id, PartNumber=number,
                         CopySource={"Bucket": self.source.bucket, "Key": src},
                         CopySourceRange=f"bytes={start}-{start + length - 1}")
        return str(resp["CopyPartResult"]["ETag"])

    async def copy(self, src: str, dst: str, size: int) -> ObjectInfo:
        if size <= MAX_SINGLE_COPY or src == dst:
            return await super().copy(src, dst, size)
        # Too large for CopyObject: a multipart upload of ranges of src, each range one request
        # with its own retries and deadline.
        part_size = max(COPY_PART_SIZE, -(-size // MAX_PARTS))
        ranges = [(i + 1, start, min(part_size, size - start))
                  for i, start in enumerate(range(0, size, part_size))]
        upload_id = await self._call("copy", lambda: self._start_upload_sync(dst))
        tokens: dict[int, str] = {}
        failed: list[BackendError] = []
        limiter = trio.CapacityLimiter(COPY_CONCURRENCY)

        async def copy_part(number: int, start: int, length: int) -> None:
            async with limiter:
                try:
                    tokens[number] = await self._call(
                        "copy", lambda: self._copy_part_sync(src, dst, upload_id, number, start, length))
                except BackendError as exc:
                    failed.append(exc)
                    nursery.cancel_scope.cancel()

        try:
            async with trio.open_nursery() as nursery:
                for number, start, length in ranges:
                    nursery.start_soon(copy_part, number, start, length)
            if failed:
                raise failed[0]
            parts = sorted(tokens.items())
            return await self._call("copy", lambda: self._complete_upload_sync(dst, upload_id, parts, size))
        except BaseException:
            with trio.move_on_after(ABORT_GRACE, shield=True):
                try:
                    await self._call("copy", lambda: self._abort_upload_sync(dst, upload_id))
                except BackendError as exc:
                    log.warning("copy %r to %r: the failed upload was not aborted: %s", src, dst, exc)
            raise

    def _close_sync(self) -> None:
        self.client.close()
        self.list_client.close()
        if self.rest is not None:
            self.rest.close()
        if self.tokens is not None:
            self.tokens.close()
