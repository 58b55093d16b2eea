"""Resolvers turn a forward's target into a stream of ``EndpointSet`` snapshots.

Every resolver implements ``watch()``: an async iterator that yields the first snapshot as
soon as the target is resolved once and a new one whenever it changes. A resolver never
raises out of ``watch()`` for a passing failure: it logs, backs off and keeps the last
snapshot serving (the consumer simply sees no new value).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from portproxy.endpoints import EndpointSet


class Resolver(Protocol):
    """Source of endpoint snapshots for one target."""

    def watch(self) -> AsyncIterator[EndpointSet]:
        """Yield a snapshot when first resolved, then on every change; runs until cancelled."""
        ...

    def describe(self) -> str:
        """Human-readable target, for logs, /forwards and `check`."""
        ...
