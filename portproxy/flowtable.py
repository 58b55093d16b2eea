"""The UDP flow table: one entry per client address, idle expiry and LRU eviction.

Pure: the clock is injected (``Callable[[], float]``, seconds, monotonic — the event loop's
``loop.time`` in the engine, a fake in tests) and the flow objects are opaque values, so
closing sockets stays the engine's job: every method that drops flows returns them.

Why an ``OrderedDict`` kept in order of last activity: every datagram in either direction
moves its flow to the end (``move_to_end`` is O(1)), so the front is always both the least
recently used flow (the eviction victim at ``max_flows``, O(1)) and the flow whose idle
deadline comes first (all flows share one ``idle_timeout``). Expiry therefore pops from the
front until it meets a live flow — O(number expired), no scan, no heap, no per-flow timer.

Driving expiry with ONE timer per forward (not one per datagram or per flow)::

    deadline = table.next_deadline()      # after add(), and after each expire()
    if deadline is not None and timer is None:
        timer = loop.call_at(deadline, on_timer)

    def on_timer():
        timer = None
        for key, flow in table.expire():
            flow.close()
        re-arm from table.next_deadline()

Activity only ever moves deadlines later, so the timer is never re-armed on traffic: when
it fires early for a flow that has since been refreshed, ``expire`` removes nothing and the
timer is re-armed at the new front's deadline.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class FlowLimits:
    """How long a UDP flow may stay idle and how many may exist at once (per forward)."""

    idle_timeout: float = 30.0
    """Seconds without a datagram in either direction before the flow is dropped; 0 means
    never. 30 s outlives DNS retries and most request/reply protocols while letting a
    client's ephemeral ports be reclaimed well within a minute."""
    max_flows: int = 10000
    """Flows at once; at the limit the least recently active flow is evicted to admit a new
    one. 0 means unlimited. Bounds memory and file descriptors (one connected socket per
    flow) under a flood of spoofed source addresses."""

    def __post_init__(self) -> None:
        if self.idle_timeout < 0:
            raise ValueError(f"idle_timeout must be >= 0 seconds, not {self.idle_timeout!r}")
        if self.max_flows < 0:
            raise ValueError(f"max_flows must be >= 0, not {self.max_flows!r}")


class _Entry(Generic[V]):
    """A flow and the clock reading of its last datagram (either direction)."""

    __slots__ = ("last_active", "value")

    def __init__(self, value: V, last_active: float) -> None:
        self.value = value
        self.last_active = last_active


class FlowTable(Generic[K, V]):
    """Flows keyed by client address, ordered by last activity.

    Not thread-safe: it belongs to one event loop. ``add`` refuses a key that is present;
    an engine that awaits between ``get`` returning ``None`` and ``add`` (e.g. while
    connecting the flow's socket) must check ``key in table`` again before adding.
    """

    def __init__(self, limits: FlowLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._flows: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._evictions = 0
        self._expirations = 0

    # -------------------------------------------------------------------- lookups

    def get(self, key: K) -> V | None:
        """The flow for ``key`` (client → backend traffic), refreshing its activity;
        ``None`` when there is none."""
        entry = self._flows.get(key)
        if entry is None:
            return None
        entry.last_active = self._clock()
        self._flows.move_to_end(key)
        return entry.value

    def touch(self, key: K) -> bool:
        """Record activity on ``key`` without looking at its value (backend → client
        replies); O(1). False when the flow is gone (expired or evicted meanwhile)."""
        entry = self._flows.get(key)
        if entry is None:
            return False
        entry.last_active = self._clock()
        self._flows.move_to_end(key)
        return True

    def peek(self, key: K) -> V | None:
        """The flow for ``key`` without counting it as activity (for status pages)."""
        entry = self._flows.get(key)
        return None if entry is None else entry.value

    def last_active(self, key: K) -> float | None:
        """Clock reading of the flow's last datagram, or ``None`` when absent."""
        entry = self._flows.get(key)
        return None if entry is None else entry.last_active

    # -------------------------------------------------------------------- changes

    def add(self, key: K, value: V) -> tuple[K, V] | None:
        """Insert a new flow as the most recently active one.

        At ``max_flows`` the least recently active flow is removed first and returned, for
        the caller to close; it counts as an expiry if its idle deadline had already
        passed (the timer just had not fired yet), otherwise as an eviction. Raises
        ``ValueError`` if ``key`` is already present (closing the old flow is the caller's
        decision, so it is never replaced silently).
        """
        if key in self._flows:
            raise ValueError(f"flow already present: {key!r}")
        now = self._clock()
        removed: tuple[K, V] | None = None
        max_flows = self.limits.max_flows
        if max_flows and len(self._flows) >= max_flows:
            old_key, old = self._flows.popitem(last=False)
            if self._is_expired(old, now):
                self._expirations += 1
            else:
                self._evictions += 1
            removed = (old_key, old.value)
        self._flows[key] = _Entry(value, now)
        return removed

    def remove(self, key: K) -> V | None:
        """Forget the flow for ``key`` (it broke or the engine closed it); its value, or
        ``None`` when absent. Not counted as an eviction or expiry."""
        entry = self._flows.pop(key, None)
        return None if entry is None else entry.value

    def expire(self, now: float | None = None) -> list[tuple[K, V]]:
        """Remove and return every flow idle for ``idle_timeout`` seconds or more at ``now``
        (default: the clock), oldest first. O(number expired)."""
        if not self.limits.idle_timeout or not self._flows:
            return []
        if now is None:
            now = self._clock()
        expired: list[tuple[K, V]] = []
        while self._flows:
            key, entry = next(iter(self._flows.items()))
            if not self._is_expired(entry, now):
                break  # ordered by activity: every later flow is younger still
            del self._flows[key]
            expired.append((key, entry.value))
        self._expirations += len(expired)
        return expired

    def clear(self) -> list[tuple[K, V]]:
        """Remove every flow (shutdown, reload) and return them, oldest first, to close."""
        flows = [(key, entry.value) for key, entry in self._flows.items()]
        self._flows.clear()
        return flows

    def _is_expired(self, entry: _Entry[V], now: float) -> bool:
        timeout = self.limits.idle_timeout
        return bool(timeout) and entry.last_active + timeout <= now

    # -------------------------------------------------------------------- timer and stats

    def next_deadline(self) -> float | None:
        """Clock time at which the oldest flow expires (``last_active + idle_timeout``),
        or ``None`` when there is nothing to expire (empty table, or idle_timeout 0)."""
        if not self.limits.idle_timeout or not self._flows:
            return None
        oldest = next(iter(self._flows.values()))
        return oldest.last_active + self.limits.idle_timeout

    @property
    def evictions(self) -> int:
        """Flows removed by ``add`` to stay within ``max_flows`` (the limit biting)."""
        return self._evictions

    @property
    def expirations(self) -> int:
        """Flows removed for being idle, by ``expire`` or by ``add`` at the limit."""
        return self._expirations

    def __len__(self) -> int:
        return len(self._flows)

    def __contains__(self, key: object) -> bool:
        return key in self._flows

    def __iter__(self) -> Iterator[K]:
        """Keys from least to most recently active; a snapshot, so the table may be
        changed while iterating (e.g. closing flows on shutdown)."""
        return iter(list(self._flows))

    def items(self) -> list[tuple[K, V]]:
        """(key, flow) pairs, least recently active first, as a snapshot list."""
        return [(key, entry.value) for key, entry in self._flows.items()]
