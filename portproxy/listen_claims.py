"""Which forward serves each address this process has bound.

Listeners set SO_REUSEPORT (workers, and the next pod of a rollout, share a port), so the
kernel also lets two *forwards* of one process bind the same address: ``lo:80`` beside
``127.0.0.1:80``, or ``:80`` beside ``[::]:80``. It then splits their clients between the
two targets at random. Likewise a dual-stack ``[::]`` listener beside an IPv4 ``0.0.0.0`` one:
the kernel sends every IPv4 client to the latter. Spec texts differ, so only the bound
address shows the clash; this registry is asked after each bind, with the socket's own
address.

Claims belong to an *owner* (an engine: one forward's TCP or UDP side), compared by
identity, so a forward reloaded away and back is two owners. An owner a reload replaced is
*retiring*: its successors may bind beside it (that overlap is the hand-over), and it may
still bind beside them (its interface gained an address meanwhile). A claim ends when its
socket closes, so nothing has to be released.
"""

from __future__ import annotations

import socket
from collections.abc import Hashable
from dataclasses import dataclass, field

from portproxy.errors import SetupError
from portproxy.sockets import host_port, is_dual_stack, unmapped

BoundKey = tuple[int, int, str, int]
"""(socket type, family, host, port) as the kernel reports them."""


def bound_keys(sock: socket.socket) -> list[BoundKey]:
    """The addresses a bound socket takes: its own, and for a dual-stack IPv6 wildcard also
    the IPv4 wildcard (it serves IPv4 clients too)."""
    host, port = sock.getsockname()[:2]
    keys: list[BoundKey] = [(sock.type, sock.family, host, port)]
    if is_dual_stack(sock):
        keys.append((sock.type, socket.AF_INET, "0.0.0.0", port))
    elif sock.family == socket.AF_INET6 and unmapped(host) != host:  # IPv4 clients only
        keys.append((sock.type, socket.AF_INET, unmapped(host), port))
    return keys


def clash(label: str, key: BoundKey, other: str) -> SetupError:
    """``label`` (``forward NAME``, ``the admin endpoint``) cannot have ``key``: ``other``
    (labelled alike) serves it."""
    kind = "udp" if key[0] == socket.SOCK_DGRAM else "tcp"
    where = host_port(key[2], key[3])
    return SetupError(f"{label}: {kind} {where} is already served by {other}, and the "
                      "kernel would split clients between the two; give them different "
                      "addresses or ports")


@dataclass(frozen=True, slots=True)
class _Claim:
    owner: Hashable
    label: str
    sock: socket.socket


@dataclass
class ListenClaims:
    retiring: set[Hashable] = field(default_factory=set)
    _claims: dict[BoundKey, list[_Claim]] = field(default_factory=dict)

    def claim(self, sock: socket.socket, owner: Hashable, name: str, label: str = "") -> None:
        """Record that ``owner`` (of forward ``name``, or what ``label`` says) bound
        ``sock``; ``SetupError`` (and ``sock`` closed) when another owner holds one of its
        addresses, unless either of the two is retiring."""
        self._forget_closed()
        keys = bound_keys(sock)
        label = label or f"forward {name}"
        if owner not in self.retiring:
            for key in keys:
                for other in self._claims.get(key, ()):
                    if other.owner is not owner and other.owner not in self.retiring:
                        sock.close()
                        raise clash(label, key, other.label)
        for key in keys:
            self._claims.setdefault(key, []).append(_Claim(owner, label, sock))

    def _forget_closed(self) -> None:
        for key, claims in list(self._claims.items()):
            open_ = [c for c in claims if c.sock.fileno() != -1]
            if open_:
                self._claims[key] = open_
            else:
                del self._claims[key]

    def sharing(self, owner: Hashable) -> set[Hashable]:
        """The other owners bound, right now, to an address ``owner`` is bound to: a
        replaced forward's successors, whatever their spec says (``lo:80`` may succeed
        ``127.0.0.1:80``, and ``eth0/ipv4:53`` plus ``eth0/ipv6:53`` succeed ``eth0:53``)."""
        found: set[Hashable] = set()
        for claims in self._claims.values():
            holders = {c.owner for c in claims if c.sock.fileno() != -1}
            if owner in holders:
                found |= holders - {owner}
        return found

    def retired(self, owner: Hashable) -> None:
        """``owner`` has stopped for good: it no longer excuses an overlap."""
        self.retiring.discard(owner)
