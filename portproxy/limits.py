"""Connection limits: per forward and across all forwards (``--max-conns``).

At a limit, listeners stop accepting and new clients wait in the kernel's accept queue
(like HAProxy's maxconn) instead of being refused; accepting resumes as soon as a connection
closes.
"""

from __future__ import annotations

from collections.abc import Callable


class SharedLimit:
    """A count of open connections with an optional ceiling and wake-ups below it."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.active = 0
        self._waiting: dict[int, Callable[[], None]] = {}

    @property
    def full(self) -> bool:
        return bool(self.limit) and self.active >= self.limit

    def acquire(self) -> None:
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        if self._waiting and not self.full:  # inline: this runs for every connection
            self._wake()

    def set_limit(self, limit: int) -> None:
        """A new ceiling (a reload); listeners waiting below it resume at once."""
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        if self._waiting and not self.full:
            waiting, self._waiting = self._waiting, {}
            for resume in waiting.values():
                resume()

    def wait(self, owner: object, resume: Callable[[], None]) -> None:
        """Call ``resume`` once, the next time the count drops below the limit."""
        self._waiting[id(owner)] = resume

    def cancel(self, owner: object) -> None:
        self._waiting.pop(id(owner), None)
