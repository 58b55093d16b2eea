"""One proxied TCP connection: two directions, half-close, timeouts, and one close.

The relay ends when both directions have delivered their end of stream, or at the first
error (then both sockets are closed with an RST so neither peer waits on a dead half),
or when the idle or half-closed (``fin-timeout``) time runs out.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass

from portproxy.connect import Address
from portproxy.deadlines import Deadlines, Slot
from portproxy.endpoints import Endpoint
from portproxy.metrics import Counter
from portproxy.poller import Poller
from portproxy.pump import CopyDirection, Direction

CLOSE_REASONS = ("ok", "reset", "idle_timeout", "fin_timeout", "drain_timeout")
"""How a relayed connection ends (``Relay.result``; the reason label of
``portproxy_connections_closed_total``)."""

_LINGER_RESET = struct.pack("ii", 1, 0)
_NOTHING_QUEUED = (0, 0)
#: SIOCOUTQ: bytes in a TCP socket's send queue, not yet acknowledged by the peer.
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)
_INT = struct.Struct("i")
_NO_INT = bytes(_INT.size)


def unsent(sock: socket.socket) -> int:
    """Bytes ``sock``'s kernel still holds for the peer (0 where it cannot tell)."""
    try:
        return int(_INT.unpack(fcntl.ioctl(sock.fileno(), _SIOCOUTQ, _NO_INT))[0])
    except OSError:
        return 0


@dataclass(frozen=True, slots=True)
class RelayTimeouts:
    idle: float
    """Seconds without a byte either way before closing; 0 = never."""
    fin: float
    """Seconds one direction may stay open after the other finished; 0 = never."""


@dataclass(frozen=True, slots=True)
class RelaySetup:
    """What every relay of one forward shares (built once, not per connection)."""

    loop: asyncio.AbstractEventLoop
    poller: Poller
    deadlines: Deadlines
    direction_type: type[Direction]
    counters: tuple[Counter, Counter]
    """Bytes upstream (client → backend) and downstream."""
    timeouts: RelayTimeouts


class Relay:
    __slots__ = (
        "client",
        "client_addr",
        "closed",
        "deadline",
        "down",
        "endpoint",
        "fin_since",
        "last_activity",
        "loop",
        "on_close",
        "peer",
        "poller",
        "queued",
        "result",
        "setup",
        "started",
        "timeouts",
        "up",
    )

    def __init__(
        self,
        setup: RelaySetup,
        client: socket.socket,
        upstream: socket.socket,
        endpoint: Endpoint,
        client_addr: Address,
        on_close: Callable[[Relay], None],
        accepted: float | None = None,
    ) -> None:
        self.setup = setup
        self.endpoint = endpoint
        self.client_addr = client_addr
        self.loop = loop = setup.loop
        self.poller = setup.poller
        self.client = client
        self.peer = upstream
        self.timeouts = setup.timeouts
        self.on_close = on_close
        self.last_activity = loop.time()
        self.started = self.last_activity if accepted is None else accepted
        """When the client was accepted: the connection's duration counts the connect."""
        self.fin_since = 0.0
        self.closed = False
        self.result = "ok"
        direction_type, counters = setup.direction_type, setup.counters
        self.up = direction_type(self, client, upstream, counters[0])
        self.down = direction_type(self, upstream, client, counters[1])
        self.deadline: Slot | None = None
        self.queued = _NOTHING_QUEUED

    def start(self) -> None:
        self.up.start()
        self.down.start()
        self._arm()

    # -- timers ---------------------------------------------------------------------------
    def _fin_deadline(self) -> float | None:
        if not (self.fin_since and self.timeouts.fin):
            return None
        # Silence while half-closed, like HAProxy's client-fin/server-fin: a download to a
        # client that half-closed after its request runs as long as it moves.
        return max(self.fin_since, self.last_activity) + self.timeouts.fin

    def _deadline(self) -> float | None:
        # Runs at every connection's start and half-close: plain comparisons, no list.
        fin = self._fin_deadline()
        if not self.timeouts.idle:
            return fin
        idle = self.last_activity + self.timeouts.idle
        return idle if fin is None or idle < fin else fin

    def _arm(self) -> None:
        deadlines = self.setup.deadlines
        if self.deadline is not None:
            deadlines.remove(self.deadline, self)
            self.deadline = None
        deadline = self._deadline()
        if deadline is not None:
            self.deadline = deadlines.add(deadline, self, self._on_timer)

    def _on_timer(self) -> None:
        self.deadline = None
        if self.closed:
            return
        now = self.loop.time()
        deadline = self._deadline()
        if deadline is None or now < deadline or self._kernel_queues_moved():
            self._arm()  # traffic moved the deadline: one timer, re-armed lazily
            return
        fin = self._fin_deadline()
        self.result = "fin_timeout" if fin is not None and now >= fin else "idle_timeout"
        self.abort(None)

    def _kernel_queues_moved(self) -> bool:
        """Whether the send queues of the two sockets changed since the last expiry: bytes
        already handed to the kernel still count as traffic while a slow reader drains
        them, though no callback of ours runs. A peer that reads nothing at all keeps the
        same queue and is idle; it gets at most one extra timeout. A queue that emptied
        since the last look moved too (the reader finished draining it meanwhile)."""
        queued = (unsent(self.client), unsent(self.peer))
        moved = queued != self.queued and (any(queued) or any(self.queued))
        if moved:
            self.last_activity = self.loop.time()
        self.queued = queued
        return moved

    # -- endings --------------------------------------------------------------------------
    def other_done(self, direction: Direction) -> bool:
        return (self.down if direction is self.up else self.up).done

    def direction_done(self) -> None:
        if self.up.done and self.down.done:
            self.close()
        elif not self.fin_since:
            self.fin_since = self.loop.time()
            self._arm()

    def src_failed(self) -> None:
        """A side that half-closed has failed since (a reset, keepalive giving up) while
        the other direction still runs: nothing more can reach it, so the connection ends
        as at any error."""
        self.abort(ConnectionResetError())

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
        if self.deadline is not None:
            self.setup.deadlines.remove(self.deadline, self)
            self.deadline = None
        self.up.stop()
        self.down.stop()
        self.up.release()
        self.down.release()
        # No epoll_ctl(DEL) for sockets about to close (see Poller.discard).
        self.poller.discard(self.up.src_fd)
        self.poller.discard(self.down.src_fd)
        self.client.close()
        self.peer.close()
        self.on_close(self)
        # The directions point back at their relay. Cutting that cycle lets reference
        # counting free a finished connection's objects at once; left to the cyclic
        # collector, thousands of connections a second trigger a collection every few
        # dozen connections, each walking every young object.
        self.up.relay = self.down.relay = None  # type: ignore[assignment]

    @property
    def bytes_up(self) -> int:
        return self.up.nbytes

    @property
    def bytes_down(self) -> int:
        return self.down.nbytes


def direction_type(use_splice: bool) -> type[Direction]:
    """The mover for ``--no-splice`` (copy) or the default (copy small, splice bulk)."""
    if use_splice:
        from portproxy.splice import AutoDirection

        return AutoDirection
    return CopyDirection
