"""A managed identity on loopback, for tests: the token endpoint Azure App Service and Functions
give a process (``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` in its environment), which
azure-identity's ``ManagedIdentityCredential`` (and so ``DefaultAzureCredential``) asks for tokens.

Each token is a JWT for the storage audience that ``azurite_server(oauth=True)`` accepts (Azurite
checks audience, issuer and times, not the signature), valid for ``lifetime`` seconds. The
endpoint refuses a request without the right header, as the real one does, and counts the tokens
it issued.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

TENANT = "ab1f708d-50f6-404c-a006-d71b2ac7a606"  # any GUID: Azurite only checks the issuer's form


def _b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def storage_token(lifetime: float) -> tuple[str, int]:
    """An (unsigned) bearer token for Azure Storage, and when it expires (epoch seconds)."""
    now = int(time.time())
    expires = now + int(lifetime)
    claims = {"aud": "https://storage.azure.com", "iss": f"https://sts.windows.net/{TENANT}/", "tid": TENANT,
              "oid": "00000000-0000-0000-0000-00000000c0fe", "iat": now - 60, "nbf": now - 60, "exp": expires}
    return f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.{secrets.token_urlsafe(16)}", expires


@dataclass
class ManagedIdentity:
    env: dict[str, str]  # what a process needs to find the endpoint
    tokens: list[str] = field(default_factory=list)  # issued, in order
    refused: int = 0  # requests without the right header


@contextlib.contextmanager
def managed_identity(lifetime: float = 3600) -> Iterator[ManagedIdentity]:
    header = secrets.token_hex(16)
    identity = ManagedIdentity({})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            if self.headers.get("X-IDENTITY-HEADER") != header or not query.get("resource"):
                identity.refused += 1
                self.send_error(400)
                return
            token, expires = storage_token(lifetime)
            identity.tokens.append(token)
            body = json.dumps({"access_token": token, "expires_on": str(expires), "token_type": "Bearer",
                               "resource": query["resource"][0]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="managed-identity")
    thread.start()
    identity.env.update(IDENTITY_ENDPOINT=f"http://127.0.0.1:{server.server_port}/msi/token",
                        IDENTITY_HEADER=header)
    try:
        yield identity
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
