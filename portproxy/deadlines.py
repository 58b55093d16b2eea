"""Coarse timers for the many deadlines of the data plane (connect, idle and fin timeouts).

Every connection has a deadline or two, and almost none of them ever fires: the connect
finishes, traffic moves the idle deadline, the connection closes. One ``loop.call_at`` per
deadline would allocate a ``TimerHandle``, push it on the loop's heap and later cancel it,
for each connection. Here deadlines are rounded UP to a slot of ``resolution`` seconds and
grouped: a slot is a dictionary entry, and only the first deadline of a slot schedules a
loop timer. Adding and removing a deadline is a dictionary update, so a burst of thousands
of short connections costs a handful of loop timers per second.

The price is precision: a deadline fires up to ``resolution`` late (and, like any loop
timer, possibly a clock tick early). Timeouts of a proxy are seconds to hours; 50 ms of
slack is invisible.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable

#: Slot width in seconds: the most a deadline can fire late.
RESOLUTION = 0.05

Slot = int
"""A token for ``remove``: the slot a deadline was filed in."""


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = RESOLUTION) -> None:
        self._loop = loop
        self._resolution = resolution
        self._slots: dict[Slot, dict[Hashable, Callable[[], None]]] = {}

    def add(self, when: float, key: Hashable, callback: Callable[[], None]) -> Slot:
        """Call ``callback`` at loop time ``when`` (or up to one slot later) unless ``key``
        is removed first. A key holds one deadline per slot."""
        slot = math.ceil(when / self._resolution)
        entries = self._slots.get(slot)
        if entries is None:
            entries = self._slots[slot] = {}
            self._loop.call_at(slot * self._resolution, self._fire, slot)
        entries[key] = callback
        return slot

    def remove(self, slot: Slot, key: Hashable) -> None:
        entries = self._slots.get(slot)
        if entries is not None:
            entries.pop(key, None)

    def __len__(self) -> int:
        """Deadlines still pending (for tests and the curious)."""
        return sum(len(entries) for entries in self._slots.values())

    def _fire(self, slot: Slot) -> None:
        entries = self._slots.pop(slot, None)
        if entries:
            for callback in entries.values():
                callback()
