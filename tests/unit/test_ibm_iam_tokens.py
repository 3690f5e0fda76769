"""The IAM token cache against the loopback token endpoint: refresh at 80% of a token's life,
the current token kept while a refresh fails, errors once it has expired."""

from __future__ import annotations

import re
import time

import pytest

from cachefs.backends.ibm_iam import IamKey, Tokens
from cachefs.errors import AccessDenied, Unreachable
from cachefs.testing.iam import IamServer


def test_refresh_before_expiry_and_failures_while_valid() -> None:
    with IamServer("the-key", ttl=3.0) as iam:
        tokens = Tokens(IamKey("the-key", "crn:1", iam.url))
        first = tokens.token()
        assert tokens.token() == first and iam.grants == 1  # cached
        assert tokens.headers() == {"Authorization": f"Bearer {first}", "ibm-service-instance-id": "crn:1"}
        time.sleep(2.5)  # past 80% of its life: exchanged again
        second = tokens.token()
        assert second != first and iam.grants == 2
        # The endpoint now refuses the key: the current token serves until it expires, then the
        # refusal is the caller's.
        iam.api_key = "rotated"
        time.sleep(2.5)  # (handed out until 95% of its life)
        assert tokens.token() == second
        time.sleep(0.5)
        with pytest.raises(AccessDenied, match=re.escape("refused the API key (400: BXNIM0415E")) as info:
            tokens.token()
        assert "the-key" not in str(info.value)
        iam.api_key = "the-key"
        assert tokens.token() not in (first, second)
        tokens.close()


def test_unreachable_endpoint() -> None:
    tokens = Tokens(IamKey("k", None, "http://127.0.0.1:9/identity/token"))
    message = "IBM IAM token endpoint http://127.0.0.1:9/identity/token: cannot connect"
    with pytest.raises(Unreachable, match=re.escape(message)):
        tokens.token()
