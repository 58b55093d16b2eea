"""A target given as a DNS name: re-resolved periodically, every address is an endpoint.

``getaddrinfo`` runs in the loop's executor (it is the system resolver: /etc/hosts,
nsswitch, search domains — the same answer the user's tools get). It exposes no TTL, so the
name is re-resolved every ``interval`` seconds. A failed lookup keeps the last good
snapshot serving (a DNS blip must not drop a working target) and is retried sooner, with a
growing delay capped at ``interval``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.spec import HostTarget
from portproxy.threaded import call_in_thread

log = logging.getLogger("portproxy.dns")

Lookup = Callable[[str], Awaitable[Sequence[str]]]
"""host → IP addresses; raises ``OSError`` (e.g. ``socket.gaierror``) on failure."""

FIRST_RETRY = 1.0
"""Seconds before retrying a failed lookup; doubles per failure up to ``interval``."""


async def system_lookup(host: str) -> list[str]:
    """Every address ``getaddrinfo`` gives for ``host``, IPv4 and IPv6, without duplicates."""
    try:
        # A thread of its own, not the loop's executor: a lookup stuck on a silent
        # nameserver must not hold the process up after SIGTERM (asyncio.run joins it).
        infos = await call_in_thread(lambda: socket.getaddrinfo(
            host, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP), name="dns-lookup")
    except UnicodeError as exc:
        # The IDNA encoding refuses the name (a label over 63 characters, an empty one): a
        # lookup failure like any other, not an error that ends the watch. An ExternalName
        # can carry such a name; Kubernetes does not check label lengths there.
        raise socket.gaierror(socket.EAI_NONAME, f"not a valid DNS name ({exc})") from None
    addresses: list[str] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0]).split("%", 1)[0]
        scope_id = sockaddr[3] if family == socket.AF_INET6 and len(sockaddr) == 4 else 0
        if scope_id:
            # A link-local address is only reachable through its interface: keep the scope
            # id (connect() reads "fe80::1%2" as interface 2).
            address = f"{address}%{scope_id}"
        if address not in addresses:
            addresses.append(address)
    return addresses


class DnsResolver:
    """Resolves a ``HostTarget`` whose host is a name, following its address changes."""

    def __init__(
        self, target: HostTarget, interval: float = 30.0, lookup: Lookup | None = None,
        forward: str = "",
    ) -> None:
        self.target = target
        self.interval = interval
        self._lookup: Lookup = lookup or system_lookup
        self._prefix = f"forward {forward}: " if forward else ""
        self.problem: str | None = None
        """Why the name does not resolve now, or None (shown by /readyz and /forwards)."""

    def describe(self) -> str:
        return str(self.target)

    async def _resolve(self) -> EndpointSet:
        addresses = await self._lookup(self.target.host)
        return EndpointSet.of([Endpoint(a, self.target.port) for a in addresses])

    async def watch(self) -> AsyncIterator[EndpointSet]:
        last: EndpointSet | None = None
        retry = FIRST_RETRY
        failing = False
        while True:
            try:
                current = await self._resolve()
            except OSError as exc:
                self.problem = f"cannot resolve {self.target.host}: {exc}"
                if not failing:
                    keeping = f"keeping {len(last)} known endpoint(s)" if last else "no endpoints"
                    log.warning("%s%s; %s, retrying", self._prefix, self.problem, keeping)
                failing = True
                await asyncio.sleep(min(retry, self.interval))
                retry = min(retry * 2, self.interval)
                continue
            if failing:
                log.info("%sresolving %s works again", self._prefix, self.target.host)
            failing, retry, self.problem = False, FIRST_RETRY, None
            if current != last:
                if last is not None:
                    added, removed = last.diff(current)
                    log.info("%s changed: +%s -%s", self.target.host,
                             [str(e) for e in added], [str(e) for e in removed])
                last = current
                yield current
            await asyncio.sleep(self.interval)
