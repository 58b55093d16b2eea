from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import pytest

from portproxy.splice import splice_available
from tests.net.harness import EchoServer
from tests.net.udp_harness import ProxyOn, UdpProxy, loop_factory

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


@pytest.fixture(params=["asyncio", "uvloop"])
def proxy_on(request: pytest.FixtureRequest) -> ProxyOn:
    """``UdpProxy`` on asyncio's loop, then on uvloop's (what the CLI prefers)."""
    factory = loop_factory(request.param)
    if factory is None:
        pytest.skip("uvloop is not installed (the 'fast' extra)")
    return partial(UdpProxy, loop_factory=factory)
