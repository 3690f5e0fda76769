"""Buckets on the session servers (moto, Azurite), seen by cachefs through a fault proxy.

Uploads and checks go straight to the server; the mount goes through a ``LatencyProxy`` that the
test drives (``proxy.inject(...)``). Each test gets a fresh bucket and a fresh proxy.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from cachefs.testing.servers import Server

from .helpers import Faulty, faulty_bucket


@pytest.fixture
def faulty_moto(moto: Server) -> Iterator[Faulty]:
    with faulty_bucket(moto, f"f-{uuid.uuid4().hex[:12]}") as fb:
        yield fb


@pytest.fixture
def faulty_azurite(azurite: Server) -> Iterator[Faulty]:
    with faulty_bucket(azurite, f"f-{uuid.uuid4().hex[:12]}") as fb:
        yield fb


@pytest.fixture(params=["moto", "azurite"])
def faulty_any(request: pytest.FixtureRequest) -> Iterator[Faulty]:
    server: Server = request.getfixturevalue(request.param)
    with faulty_bucket(server, f"f-{uuid.uuid4().hex[:12]}") as fb:
        yield fb

