"""The live state of one forward's target: the latest endpoints and how to choose one.

Shared by the TCP and UDP engines of a ``tcp+udp`` forward, so both see the same endpoints
and balancing cursor. Passive health is kept per protocol: an endpoint's TCP and UDP sides
fail apart (a DNS server whose TCP listener is down still answers over UDP), and a success
of one must not clear the other's failures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from portproxy.endpoints import Balancer, Endpoint, EndpointSet, PassiveHealth
from portproxy.metrics import Gauge
from portproxy.resolve import Resolver

log = logging.getLogger("portproxy.target")


class TargetState:
    def __init__(
        self,
        forward: str,
        resolver: Resolver,
        balancer: Balancer,
        endpoints_gauge: Gauge | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.forward = forward
        self.resolver = resolver
        self.balancer = balancer
        self.health = PassiveHealth(clock)
        """Failed TCP connects."""
        self.udp_health = PassiveHealth(clock)
        """Refused UDP datagrams (ICMP port unreachable)."""
        self.endpoints = EndpointSet()
        self.resolved = False
        self.active: dict[tuple[str, int], int] = {}
        self._gauge = endpoints_gauge
        self._listeners: list[Callable[[EndpointSet], None]] = []

    @property
    def problem(self) -> str | None:
        """Why the target does not resolve now, when the resolver can tell (else None)."""
        problem: str | None = getattr(self.resolver, "problem", None)
        return problem

    def on_change(self, callback: Callable[[EndpointSet], None]) -> None:
        self._listeners.append(callback)

    def off_change(self, callback: Callable[[EndpointSet], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def update(self, endpoints: EndpointSet) -> None:
        added, removed = self.endpoints.diff(endpoints)
        if added or removed or not self.resolved:
            log.info(
                "forward %s: endpoints %s (+%s -%s)", self.forward,
                [str(e) for e in endpoints.endpoints] or "none",
                [str(e) for e in added], [str(e) for e in removed],
                extra={"forward": self.forward, "endpoints": [str(e) for e in endpoints.endpoints]},
            )
        self.endpoints = endpoints
        self.resolved = True
        self.health.forget_missing(endpoints)
        self.udp_health.forget_missing(endpoints)
        if self._gauge is not None:
            self._gauge.set(len(endpoints))
        # A copy: a callback may unsubscribe itself (a finished hand-over), and removing from
        # the list being iterated would skip the next callback.
        for callback in list(self._listeners):
            callback(endpoints)

    async def follow(self) -> None:
        """Consume the resolver until cancelled (one task per target, owned by the daemon)."""
        async for endpoints in self.resolver.watch():
            self.update(endpoints)

    def candidates(self, client_ip: str, health: PassiveHealth | None = None
                   ) -> list[Endpoint]:
        """The endpoints to try for a new client, in order: the balancer's pick among the
        healthy ones, then those benched after failures (all of them, when every one is).
        ``health``: the record to go by (``udp_health`` for UDP; TCP's by default)."""
        endpoints = self.endpoints
        benched = (health or self.health).benched(endpoints.endpoints)
        if not benched or len(benched) == len(endpoints):
            return self.balancer.order(endpoints, client_ip, self.active)
        # Balanced among the healthy only: ordering all and moving the benched to the end
        # would give each benched endpoint's round-robin turns to its neighbour.
        healthy = EndpointSet(tuple(e for e in endpoints.endpoints if e not in benched))
        return self.balancer.order(healthy, client_ip, self.active) + benched

    def opened(self, endpoint: Endpoint) -> None:
        self.active[endpoint.key] = self.active.get(endpoint.key, 0) + 1

    def closed(self, endpoint: Endpoint) -> None:
        left = self.active.get(endpoint.key, 1) - 1
        if left:
            self.active[endpoint.key] = left
        else:
            self.active.pop(endpoint.key, None)
