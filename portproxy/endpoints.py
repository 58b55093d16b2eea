"""Backends and how to choose among them. Pure: no I/O, clocks and randomness are injected.

An ``EndpointSet`` is an immutable snapshot produced by a resolver (static, DNS or Kubernetes);
a ``Balancer`` orders a snapshot's endpoints for one new connection: the first is tried first,
the rest are the bounded fallbacks tried when connecting fails.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class BalancePolicy(StrEnum):
    """How a new connection (or UDP flow) picks its endpoint."""

    ROUND_ROBIN = "round-robin"
    LEAST_CONN = "least-conn"
    RANDOM = "random"
    SOURCE_IP = "source-ip"


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One backend address.

    ``host`` is an IP literal (IPv4 or IPv6 without brackets); ``node_name`` is the
    Kubernetes node the pod runs on, when known, for node-local preference.
    """

    host: str
    port: int
    node_name: str | None = field(default=None, compare=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def key(self) -> tuple[str, int]:
        """Identity of the endpoint, independent of metadata such as the node."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """An immutable snapshot of the usable endpoints of one target.

    ``endpoints`` are sorted and unique. An empty set is valid: the target resolved but has
    no ready backend (new connections are then refused quickly, not hung).
    """

    endpoints: tuple[Endpoint, ...] = ()

    @classmethod
    def of(cls, endpoints: Sequence[Endpoint]) -> EndpointSet:
        unique: dict[tuple[str, int], Endpoint] = {}
        for endpoint in endpoints:
            unique.setdefault(endpoint.key, endpoint)
        return cls(tuple(sorted(unique.values())))

    def __len__(self) -> int:
        return len(self.endpoints)

    def __bool__(self) -> bool:
        return bool(self.endpoints)

    def diff(self, newer: EndpointSet) -> tuple[list[Endpoint], list[Endpoint]]:
        """(added, removed) going from ``self`` to ``newer``, for logs."""
        old = {e.key for e in self.endpoints}
        new = {e.key for e in newer.endpoints}
        return (
            [e for e in newer.endpoints if e.key not in old],
            [e for e in self.endpoints if e.key not in new],
        )


def _hash64(*parts: str) -> int:
    digest = hashlib.blake2b("\x00".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Balancer:
    """Orders a snapshot's endpoints for one new connection.

    Stateless apart from the round-robin cursor. ``active`` maps an endpoint's key to its
    open connection count (for least-conn). With ``node_name`` set, endpoints on that node
    come first whenever there are any (kube-proxy's internalTrafficPolicy=Local idea, but
    with a fallback instead of a black hole).
    """

    def __init__(
        self,
        policy: BalancePolicy,
        node_name: str | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.policy = policy
        self.node_name = node_name
        self._rng = rng
        self._cursor = 0

    def order(
        self,
        endpoints: EndpointSet,
        client_ip: str = "",
        active: Mapping[tuple[str, int], int] | None = None,
    ) -> list[Endpoint]:
        candidates = list(endpoints.endpoints)
        if not candidates:
            return []
        if self.node_name is not None:
            local = [e for e in candidates if e.node_name == self.node_name]
            if local:
                others = [e for e in candidates if e.node_name != self.node_name]
                return self._order(local, client_ip, active) + self._order(
                    others, client_ip, active
                )
        return self._order(candidates, client_ip, active)

    def _order(
        self,
        candidates: list[Endpoint],
        client_ip: str,
        active: Mapping[tuple[str, int], int] | None,
    ) -> list[Endpoint]:
        if not candidates:
            return []
        policy = self.policy
        if policy is BalancePolicy.ROUND_ROBIN:
            start = self._cursor % len(candidates)
            self._cursor += 1
            return candidates[start:] + candidates[:start]
        if policy is BalancePolicy.LEAST_CONN:
            counts = active or {}
            # Ties are broken by a rotating start so equal endpoints share the load.
            start = self._cursor % len(candidates)
            self._cursor += 1
            rotated = candidates[start:] + candidates[:start]
            return sorted(rotated, key=lambda e: counts.get(e.key, 0))
        if policy is BalancePolicy.RANDOM:
            start = int(self._rng() * len(candidates)) % len(candidates)
            return candidates[start:] + candidates[:start]
        # SOURCE_IP: rendezvous (highest-random-weight) hashing. Each client keeps its endpoint
        # when unrelated endpoints come or go; only clients of a removed endpoint move.
        return sorted(
            candidates, key=lambda e: _hash64(client_ip, e.host, str(e.port)), reverse=True
        )


_MAX_FAILURES_COUNTED = 64


class PassiveHealth:
    """Passes over endpoints that recently failed to connect, for a growing period.

    After the n-th consecutive failure an endpoint is skipped for ``base * 2**(n-1)`` seconds
    (capped). A success clears it. Skipped endpoints go to the end of the order rather than
    away, so a target whose every endpoint failed recently is still tried (``TargetState``).
    """

    def __init__(self, clock: Callable[[], float], base: float = 1.0, cap: float = 30.0) -> None:
        self._clock = clock
        self._base = base
        self._cap = cap
        self.failing: dict[tuple[str, int], tuple[int, float]] = {}
        """Per endpoint key: consecutive failures, and until when it is skipped. Read-only
        outside this class; empty when none failed (a check cheaper than a call)."""

    def failed(self, endpoint: Endpoint) -> None:
        count, _ = self.failing.get(endpoint.key, (0, 0.0))
        # The count stops where the delay has long reached the cap: a backend down for an
        # hour fails thousands of times, and 2.0 ** 1024 no longer fits in a float.
        count = min(count + 1, _MAX_FAILURES_COUNTED)
        delay = min(self._cap, self._base * 2.0 ** (count - 1))
        self.failing[endpoint.key] = (count, self._clock() + delay)

    def succeeded(self, endpoint: Endpoint) -> None:
        if self.failing:
            self.failing.pop(endpoint.key, None)

    def is_benched(self, endpoint: Endpoint) -> bool:
        entry = self.failing.get(endpoint.key)
        return entry is not None and entry[1] > self._clock()

    def benched(self, endpoints: Sequence[Endpoint]) -> list[Endpoint]:
        """Those of ``endpoints`` skipped now, in their order."""
        if not self.failing:
            return []
        return [e for e in endpoints if self.is_benched(e)]

    def forget_missing(self, current: EndpointSet) -> None:
        keys = {e.key for e in current.endpoints}
        for key in [k for k in self.failing if k not in keys]:
            del self.failing[key]
