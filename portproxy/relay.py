"""One proxied TCP connection: two directions, half-close, timeouts, and one close.

The relay ends when both directions have delivered their end of stream, or at the first
error (then both sockets are closed with an RST so neither peer waits on a dead half),
or when the idle or half-closed (``fin-timeout``) time runs out.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from portproxy.metrics import Counter
from portproxy.poller import poller_for
from portproxy.pump import CopyDirection, Direction

_LINGER_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class RelayTimeouts:
    idle: float
    """Seconds without a byte either way before closing; 0 = never."""
    fin: float
    """Seconds one direction may stay open after the other finished; 0 = never."""


class Relay:
    __slots__ = (
        "client",
        "closed",
        "down",
        "endpoint",
        "fin_since",
        "last_activity",
        "loop",
        "on_close",
        "peer",
        "poller",
        "result",
        "started",
        "timeouts",
        "timer",
        "up",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        upstream: socket.socket,
        direction_type: type[Direction],
        counters: tuple[Counter, Counter],
        timeouts: RelayTimeouts,
        on_close: Callable[[Relay], None],
    ) -> None:
        self.loop = loop
        self.poller = poller_for(loop)
        self.client = client
        self.peer = upstream
        self.timeouts = timeouts
        self.on_close = on_close
        self.started = self.last_activity = loop.time()
        self.fin_since = 0.0
        self.closed = False
        self.result = "ok"
        self.up = direction_type(self, client, upstream, counters[0])
        self.down = direction_type(self, upstream, client, counters[1])
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.up.start()
        self.down.start()
        self._arm()

    # -- timers ---------------------------------------------------------------------------
    def _deadline(self) -> float | None:
        deadlines = []
        if self.timeouts.idle:
            deadlines.append(self.last_activity + self.timeouts.idle)
        if self.fin_since and self.timeouts.fin:
            deadlines.append(self.fin_since + self.timeouts.fin)
        return min(deadlines) if deadlines else None

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        deadline = self._deadline()
        if deadline is not None:
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        if self.fin_since and self.timeouts.fin and now >= self.fin_since + self.timeouts.fin:
            self.result = "fin_timeout"
            self.abort(None)
        elif self.timeouts.idle and now >= self.last_activity + self.timeouts.idle:
            self.result = "idle_timeout"
            self.abort(None)
        else:
            self._arm()  # traffic moved the deadline: one timer, re-armed lazily

    # -- endings --------------------------------------------------------------------------
    def other_done(self, direction: Direction) -> bool:
        return (self.down if direction is self.up else self.up).done

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self.close()
        elif not self.fin_since:
            self.fin_since = self.loop.time()
            self._arm()

    def abort(self, exc: OSError | None) -> None:
        """Close both sides at once with RST (an error, a timeout, or a forced drain)."""
        if self.closed:
            return
        if exc is not None:
            self.result = "reset"
        for sock in (self.client, self.peer):
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.up.stop()
        self.down.stop()
        self.up.release()
        self.down.release()
        self.client.close()
        self.peer.close()
        self.on_close(self)

    @property
    def bytes_up(self) -> int:
        return self.up.nbytes

    @property
    def bytes_down(self) -> int:
        return self.down.nbytes


def direction_type(use_splice: bool) -> type[Direction]:
    if use_splice:
        from portproxy.splice import SpliceDirection

        return SpliceDirection
    return CopyDirection
