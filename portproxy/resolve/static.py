"""A target given as an IP literal: one endpoint, one snapshot, forever."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.spec import HostTarget


class StaticResolver:
    """Resolves ``HostTarget`` IP literals; there is nothing to follow, so it yields once."""

    def __init__(self, target: HostTarget) -> None:
        self.target = target
        # Normalise (``FD00::0:1`` → ``fd00::1``) so logs and metrics use one spelling.
        host = str(ipaddress.ip_address(target.host.strip("[]")))
        self._snapshot = EndpointSet.of([Endpoint(host, target.port)])

    def describe(self) -> str:
        return str(self.target)

    async def watch(self) -> AsyncIterator[EndpointSet]:
        yield self._snapshot
        # Runs until cancelled, like every resolver, so consumers need no special case.
        await asyncio.Event().wait()
