"""A finished connection is freed by reference counting: no cyclic garbage per connection.

At thousands of short connections a second, objects left in reference cycles make the
cyclic collector run every few dozen connections (a measurable share of the proxy's CPU).
"""

from __future__ import annotations

import collections
import gc
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import wait_for
from tests.net.harness import EchoServer, ProxyThread, recv_all


@pytest.fixture
def no_automatic_gc() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    gc.collect()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()


def short_connection(proxy: ProxyThread, payload: bytes) -> None:
    with proxy.connect() as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == payload


def test_closed_connections_leave_no_reference_cycles(
        pump: str, echo_server: EchoServer, no_automatic_gc: None) -> None:
    proxy = ProxyThread(echo_server.port, pump)
    try:
        short_connection(proxy, b"warm-up")  # first-use caches (pipe pool, metric children)
        wait_for(lambda: proxy.run(lambda: proxy.engine.active == 0))
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector would free stays inspectable
        for i in range(50):
            short_connection(proxy, f"request {i}".encode() * 8)
        wait_for(lambda: proxy.run(lambda: proxy.engine.active == 0))
        gc.collect()
        leaked = collections.Counter(type(o).__qualname__ for o in gc.garbage)
        assert not leaked, f"objects freed only by the cyclic collector: {leaked.most_common(8)}"
    finally:
        proxy.close()
