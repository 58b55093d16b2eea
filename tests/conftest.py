"""Shared test helpers: deadlines instead of sleeps; no timing limits in property tests."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

from hypothesis import settings

# Hypothesis fails an example that takes over 200 ms by default: a timing threshold that a
# loaded CI machine can trip. Property tests check results, never speed.
settings.register_profile("portproxy", deadline=None)
settings.load_profile("portproxy")

# Test traffic stays on loopback: an http_proxy in the environment (a CI runner's) must not
# capture the tests' own HTTP requests to admin endpoints and fake API servers.
for _variable in ("no_proxy", "NO_PROXY"):
    os.environ[_variable] = ",".join(
        filter(None, (os.environ.get(_variable), "127.0.0.1", "localhost", "::1")))

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.01) -> T:
    """Poll ``predicate`` until it returns a truthy value, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
