"""Which forward serves each address this process has bound.

Listeners set SO_REUSEPORT (workers, and the next pod of a rollout, share a port), so the
kernel also lets two *forwards* of one process bind the same address: ``lo:80`` beside
``127.0.0.1:80``, or ``:80`` beside ``[::]:80``. It then splits their clients between the
two targets at random. Spec texts differ, so only the bound address shows the clash; this
registry is asked after each bind, with the socket's own address.

A forward a reload replaced is *retiring*: its successor may bind beside it (that overlap is
the hand-over). A claim ends when its socket closes, so nothing has to be released.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from portproxy.errors import SetupError
from portproxy.spec import Forward

BoundKey = tuple[int, int, str, int]
"""(socket type, family, host, port) as the kernel reports them."""


@dataclass(frozen=True, slots=True)
class _Claim:
    forward: Forward
    sock: socket.socket


@dataclass
class ListenClaims:
    retiring: set[Forward] = field(default_factory=set)
    _claims: dict[BoundKey, list[_Claim]] = field(default_factory=dict)

    def claim(self, sock: socket.socket, forward: Forward) -> None:
        """Record that ``forward`` bound ``sock``; ``SetupError`` (and ``sock`` closed) when
        another forward that is not retiring holds the same address."""
        host, port = sock.getsockname()[:2]
        key = (sock.type, sock.family, host, port)
        self._forget_closed()
        live = self._claims.get(key, [])
        for other in live:
            if other.forward != forward and other.forward not in self.retiring:
                sock.close()
                kind = "udp" if key[0] == socket.SOCK_DGRAM else "tcp"
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                raise SetupError(
                    f"forward {forward.name}: {kind} {where} is already served by forward "
                    f"{other.forward.name}, and the kernel would split clients between the "
                    "two; give them different addresses or ports")
        live.append(_Claim(forward, sock))
        self._claims[key] = live

    def _forget_closed(self) -> None:
        for key, claims in list(self._claims.items()):
            open_ = [c for c in claims if c.sock.fileno() != -1]
            if open_:
                self._claims[key] = open_
            else:
                del self._claims[key]

    def sharing(self, forward: Forward) -> set[Forward]:
        """The other forwards bound, right now, to an address ``forward`` is bound to: a
        replaced forward's successors, whatever their spec says (``lo:80`` may succeed
        ``127.0.0.1:80``, and ``eth0/ipv4:53`` plus ``eth0/ipv6:53`` succeed ``eth0:53``)."""
        found: set[Forward] = set()
        for claims in self._claims.values():
            holders = {c.forward for c in claims if c.sock.fileno() != -1}
            if forward in holders:
                found |= holders - {forward}
        return found

    def retired(self, forward: Forward) -> None:
        """``forward`` has stopped for good: it no longer excuses an overlap."""
        self.retiring.discard(forward)
