"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.net.harness import EchoServer


@pytest.fixture
def backend() -> Iterator[EchoServer]:
    """A threaded echo backend on 127.0.0.1 (half-closes after the client does)."""
    server = EchoServer()
    try:
        yield server
    finally:
        server.close()
