from __future__ import annotations

from collections.abc import Iterator

import pytest

from portproxy.splice import splice_available
from tests.net.harness import EchoServer

PUMPS = ["splice", "splice-only", "copy"]
"""The default mover (copies small transfers, splices bulk), pure splicing, and copying."""


@pytest.fixture(params=PUMPS)
def pump(request: pytest.FixtureRequest) -> str:
    """Every data-plane test runs against every mover."""
    if request.param.startswith("splice") and not splice_available()[0]:
        pytest.skip(f"splice unavailable here: {splice_available()[1]}")
    return str(request.param)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()
