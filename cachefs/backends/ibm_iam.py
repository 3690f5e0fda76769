"""IBM Cloud IAM API keys for IBM COS: the key is exchanged for bearer tokens, kept fresh.

Read from the environment under the names IBM's own SDK (ibm-cos-sdk) uses: ``IBM_API_KEY_ID``
(or ``IBM_API_KEY_ID_FILE``, a file holding it), ``IBM_SERVICE_INSTANCE_ID`` (optional; sent as
``ibm-service-instance-id``) and ``IBM_AUTH_ENDPOINT`` (the token endpoint, IBM's public one by
default; set it for private endpoints). The key is exchanged with the standard API-key grant
(``grant_type=urn:ibm:params:oauth:grant-type:apikey``) for an access token; ``Tokens.token()``
hands out the current one and exchanges the key again once 80% of its lifetime has passed (what
IBM's SDKs do), so a token in use always has a fifth of its life left. Every request asks for the
token when it is sent: a read or prefetch that lasts longer than a token uses fresh ones. When
the store refuses a token before its time (revoked), the backend calls ``expire`` and sends the
request once more with a new one (``S3Backend._token_retry``).

If a refresh fails while the current token is still valid, the current one is used and the
refresh is tried again a second later; once it is about to expire, the failure is the request's: a
refused key is ``AccessDenied`` (exit code 3 at mount time), an unreachable endpoint
``Unreachable``, anything else ``TemporaryFailure`` (retried by ``retry.py``). Neither the key
nor a token ever goes into a message.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import urllib3

from ..credentials import env_secret
from ..errors import AccessDenied, BackendError, TemporaryFailure, Unreachable, redact, temporary_status

log = logging.getLogger(__name__)

DEFAULT_AUTH_ENDPOINT = "https://iam.cloud.ibm.com/identity/token"
GRANT_TYPE = "urn:ibm:params:oauth:grant-type:apikey"
REFRESH_AT = 0.8  # of a token's lifetime
# A token is not handed out in the last 5% of its life (at most 30 s): a request must reach the
# store before the token expires.
EXPIRY_MARGIN = 0.05
EXPIRY_MARGIN_MAX = 30.0
RETRY_AFTER = 1.0  # seconds between refresh attempts while the current token is still valid
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0


class KeyRefused(AccessDenied):
    """The token endpoint refused the API key (not the store a token)."""


@dataclass(frozen=True)
class IamKey:
    api_key: str
    service_instance_id: str | None
    auth_endpoint: str


def key_from_env() -> IamKey | None:
    """The API key and its settings from the environment, or None without a key."""
    api_key = env_secret("IBM_API_KEY_ID")
    if not api_key:
        return None
    return IamKey(api_key, os.environ.get("IBM_SERVICE_INSTANCE_ID") or None,
                  os.environ.get("IBM_AUTH_ENDPOINT") or DEFAULT_AUTH_ENDPOINT)


class Tokens:
    """The current bearer token for one API key; safe to call from many threads at once."""

    def __init__(self, key: IamKey) -> None:
        self.key = key
        self._http = urllib3.PoolManager(num_pools=1, maxsize=2, retries=False,
                                         timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT, read=READ_TIMEOUT))
        self._lock = threading.Lock()
        self._token: str | None = None
        self._usable = 0.0  # time.monotonic() until which the token may be handed out
        self._refresh = 0.0  # when to exchange the key again
        self.exchanges = 0

    @property
    def secrets(self) -> tuple[str, ...]:
        """The key and the current token, for the log redactor (tokens are also scrubbed by form)."""
        return tuple(s for s in (self.key.api_key, self._token) if s)

    @property
    def current(self) -> str | None:
        """The token handed out last (None before the first exchange)."""
        return self._token

    def expire(self, token: str | None) -> None:
        """The store refused ``token``: if it is still the current one, exchange the key again
        at the next request (and do not fall back on it if that fails)."""
        with self._lock:
            if token is not None and token == self._token:
                log.info("the store refused the current IBM IAM token; exchanging the API key again")
                self._refresh = self._usable = 0.0

    def token(self) -> str:
        now = time.monotonic()
        if self._token is not None and now < self._refresh:
            return self._token
        with self._lock:
            now = time.monotonic()
            if self._token is not None and now < self._refresh:
                return self._token
            try:
                token, lifetime = self._exchange()
            except BackendError as exc:
                if self._token is not None and now < self._usable:
                    log.warning("IBM IAM token refresh failed (%s); using the current token for "
                                "%.0f s more", exc, self._usable - now)
                    self._refresh = min(now + RETRY_AFTER, self._usable)
                    return self._token
                raise
            self._token = token
            self._usable = now + lifetime - min(lifetime * EXPIRY_MARGIN, EXPIRY_MARGIN_MAX)
            self._refresh = now + lifetime * REFRESH_AT
            self.exchanges += 1
            return token

    def headers(self) -> dict[str, str]:
        """The headers that authorise one request."""
        headers = {"Authorization": f"Bearer {self.token()}"}
        if self.key.service_instance_id:
            headers["ibm-service-instance-id"] = self.key.service_instance_id
        return headers

    def _exchange(self) -> tuple[str, float]:
        """A new access token and its lifetime in seconds."""
        where = f"IBM IAM token endpoint {self.key.auth_endpoint}"
        try:
            resp = self._http.request(
                "POST", self.key.auth_endpoint,
                fields={"grant_type": GRANT_TYPE, "apikey": self.key.api_key},
                encode_multipart=False, headers={"Accept": "application/json"})
        except urllib3.exceptions.HTTPError as exc:
            raise Unreachable(f"{where}: cannot connect ({type(exc).__name__})") from None
        try:
            body = json.loads(resp.data)
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if resp.status != 200:
            detail = " ".join(str(body.get(k, "")) for k in ("errorCode", "errorMessage")).strip()
            detail = redact(detail, (self.key.api_key,))[:200]
            if resp.status in (400, 401, 403):
                raise KeyRefused(f"{where} refused the API key ({resp.status}{': ' + detail if detail else ''})")
            if temporary_status(resp.status):
                raise TemporaryFailure(f"{where}: {resp.status}")
            raise BackendError(f"{where}: refused ({resp.status}{': ' + detail if detail else ''})")
        token, lifetime = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not token or not isinstance(lifetime, int | float) or lifetime <= 0:
            raise TemporaryFailure(f"{where}: an answer without access_token and expires_in")
        return token, float(lifetime)

    def close(self) -> None:
        self._http.clear()
