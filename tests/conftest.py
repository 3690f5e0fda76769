"""Session-wide real servers on 127.0.0.1: moto, SeaweedFS and Azurite (started on first use)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cachefs.testing.servers import Server, azurite_server, moto_server, seaweed_server


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-seconds", type=float, default=None,
                     help="how long tests/faults soaks the daemon (default $CACHEFS_SOAK_SECONDS or 60)")


@pytest.fixture(scope="session")
def moto() -> Iterator[Server]:
    with moto_server() as server:
        yield server


@pytest.fixture(scope="session")
def seaweed() -> Iterator[Server]:
    with seaweed_server() as server:
        yield server


@pytest.fixture(scope="session")
def azurite() -> Iterator[Server]:
    with azurite_server() as server:
        yield server


@pytest.fixture(scope="session", params=["moto", "seaweed"])
def s3_server(request: pytest.FixtureRequest) -> Server:
    """Each S3 server in turn: a test using it runs against moto and against SeaweedFS."""
    server: Server = request.getfixturevalue(request.param)
    return server
