"""A fresh bucket per test module, on each real server: moto, SeaweedFS (S3) and Azurite."""

from __future__ import annotations

import uuid

import pytest

from cachefs.testing.servers import Server

from .stores import Bucket


@pytest.fixture(scope="module", params=["moto", "seaweed", "azurite"])
def any_bucket(request: pytest.FixtureRequest) -> Bucket:
    server: Server = request.getfixturevalue(request.param)
    name = f"t-{uuid.uuid4().hex[:12]}"
    server.create_bucket(name)
    client = server.s3_client() if server.kind == "s3" else server.blob_service().get_container_client(name)
    return Bucket(server.kind, name, server.endpoint_url, server.env, client)


@pytest.fixture
def s3_bucket(seaweed: Server) -> Bucket:
    """A fresh bucket on SeaweedFS, for tests whose subject does not depend on the backend."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    seaweed.create_bucket(name)
    return Bucket("s3", name, seaweed.endpoint_url, seaweed.env, seaweed.s3_client())
