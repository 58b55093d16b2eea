"""IP_PKTINFO / IPV6_PKTINFO: which local address a datagram was sent to, and replying from it.

A UDP listener bound to a wildcard address on a host with several addresses would, left to
itself, send replies from whatever source address routing picks; DNS resolvers and most
other clients drop a reply that does not come from the address they asked. With PKTINFO on,
each received datagram carries its destination address as ancillary data, and the reply is
sent with the same ancillary data type, which makes the kernel use that address as source.

Linux details this relies on (checked on the kernels we support):

- A dual-stack ``AF_INET6`` socket with ``IPV6_RECVPKTINFO`` reports IPv4 datagrams as
  ``IPV6_PKTINFO`` with the IPv4-mapped address. That is only the header destination: for a
  datagram sent to a broadcast or multicast address it is no valid source for the reply. So
  such a socket also asks for ``IP_PKTINFO``, which the kernel adds for IPv4 datagrams (after
  the IPv6 one) with ``spec_dst``, and which it accepts when sending to a mapped client;
  it is preferred whenever present.
- ``struct in_pktinfo`` is ``{ifindex, spec_dst, addr}``: ``addr`` is the header destination
  (what the client sent to), ``spec_dst`` the local address to answer from (they differ for
  broadcast). Sending with ``spec_dst`` set and ``ifindex`` 0 chooses the source address and
  leaves the outgoing interface to routing, so asymmetric routing keeps working.
- IPv6 keeps the interface index only for link-local addresses, which need it to mean
  anything; a multicast destination cannot be a source, so replies then go without PKTINFO.

Only listeners that need it get pktinfo (``needs_pktinfo``): a socket bound to one unicast
address already sends from that address, so there the per-datagram ancillary parsing and
the ancillary data on every reply are skipped (``LocalAddresses`` hands out the bound
address instead).

The same ancillary data also carries ``SO_RXQ_OVFL``: the socket's running count of datagrams
the kernel dropped because its receive buffer was full. The kernel attaches it only once a
drop has happened, so it costs nothing until a flood, and then the engine can count drops
it never saw.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass

# Python 3.11 does not export IP_PKTINFO; 8 is its value in Linux's <linux/in.h>.
IP_PKTINFO: int = getattr(socket, "IP_PKTINFO", 8)
IPV6_PKTINFO: int = socket.IPV6_PKTINFO
IPV6_RECVPKTINFO: int = socket.IPV6_RECVPKTINFO
# Linux <asm-generic/socket.h>; Python does not export it.
SO_RXQ_OVFL: int = getattr(socket, "SO_RXQ_OVFL", 40)
#: Ancillary buffer for recvmsg: one pktinfo of either family and the drop count, with slack.
ANCILLARY_SIZE = socket.CMSG_SPACE(20) * 2 + socket.CMSG_SPACE(4)
#: Ancillary buffer for a flow socket's recvmsg: the drop count only.
DROPS_ANCILLARY_SIZE = socket.CMSG_SPACE(4) * 2

Ancillary = tuple[int, int, bytes]
_NO_IFINDEX = bytes(4)
_SOL_IP: int = socket.IPPROTO_IP
_SOL_IPV6: int = socket.IPPROTO_IPV6


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """Where one client's datagrams arrived, and the ancillary data to answer from there."""

    raw: bytes
    """The pktinfo bytes as received; compared per datagram to notice a change cheaply."""
    host: str
    """The address the client sent to (IPv4-mapped text on a dual-stack socket)."""
    reply: tuple[Ancillary, ...]
    """Ancillary data for ``sendmsg`` of every reply (empty: let the kernel choose)."""


def enable_drop_count(sock: socket.socket) -> None:
    """Ask the kernel to report, after the fact, the datagrams it dropped on ``sock`` for
    want of receive buffer space."""
    sock.setsockopt(socket.SOL_SOCKET, SO_RXQ_OVFL, 1)


def enable(sock: socket.socket) -> None:
    """Ask the kernel to report each datagram's destination address on ``sock``, and the
    count of datagrams it dropped for want of buffer space."""
    enable_drop_count(sock)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        if not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)  # its IPv4 datagrams
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def needs_pktinfo(sock: socket.socket) -> bool:
    """Whether replies on ``sock`` need pktinfo to leave from the right address: a socket
    bound to one unicast address sends from it anyway (no ancillary data to parse per
    datagram then); a wildcard, multicast or broadcast one does not."""
    host = sock.getsockname()[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return True
    return ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255"


def bound_address(sock: socket.socket) -> LocalAddress:
    """The ``LocalAddress`` of a socket bound to one address (no pktinfo needed)."""
    return LocalAddress(b"", str(sock.getsockname()[0]).split("%", 1)[0], ())


def pktinfo_of(ancdata: list[Ancillary]) -> bytes:
    """The raw pktinfo bytes among ``ancdata`` (b"" when absent), IP_PKTINFO first (see the
    module docstring); on the per-datagram path, so it only compares ints."""
    found = b""
    for level, kind, data in ancdata:
        if kind == IP_PKTINFO and level == _SOL_IP:
            return data
        if kind == IPV6_PKTINFO and level == _SOL_IPV6:
            found = data
    return found


def kernel_drops(ancdata: list[Ancillary]) -> int:
    """The socket's cumulative receive-buffer drop count in ``ancdata``, or -1 if absent."""
    for level, kind, data in ancdata:
        if kind == SO_RXQ_OVFL and level == socket.SOL_SOCKET and len(data) >= 4:
            return int.from_bytes(data[:4], sys.byteorder)
    return -1


def local_address(ancdata: list[Ancillary], sock: socket.socket) -> LocalAddress:
    """Decode the pktinfo in ``ancdata`` (IP_PKTINFO first, as ``pktinfo_of``); the address
    ``sock`` is bound to when there is none."""
    data = pktinfo_of(ancdata)
    if len(data) == 12:
        return _from_in_pktinfo(data, mapped=sock.family == socket.AF_INET6)
    if len(data) >= 20:
        return _from_in6_pktinfo(data)
    return LocalAddress(b"", str(sock.getsockname()[0]), ())


def _from_in_pktinfo(data: bytes, mapped: bool = False) -> LocalAddress:
    spec_dst, destination = data[4:8], data[8:12]
    reply = (socket.IPPROTO_IP, IP_PKTINFO, _NO_IFINDEX + spec_dst + bytes(4))
    host = socket.inet_ntop(socket.AF_INET, destination)
    # On a dual-stack socket the client is ::ffff:a.b.c.d: keep the local side in the same
    # family (PROXY headers, logs).
    return LocalAddress(data, "::ffff:" + host if mapped else host, (reply,))


def _from_in6_pktinfo(data: bytes) -> LocalAddress:
    address = data[:16]
    host = socket.inet_ntop(socket.AF_INET6, address)
    if address[0] == 0xFF:  # multicast: not a valid source, let the kernel pick one
        return LocalAddress(data, host, ())
    link_local = address[0] == 0xFE and address[1] & 0xC0 == 0x80
    ifindex = data[16:20] if link_local else _NO_IFINDEX
    return LocalAddress(data, host, ((socket.IPPROTO_IPV6, IPV6_PKTINFO, address + ifindex),))


#: Decoded local addresses kept per forward: a host has a few; the cap only matters if
#: something odd (many addresses, interface indexes) keeps adding entries.
LOCAL_CACHE = 256


class LocalAddresses:
    """Where clients sent to, per listening socket of a forward: the socket's own address
    when it is bound to one, else decoded from the pktinfo once per distinct local address
    (not once per flow)."""

    def __init__(self) -> None:
        self.bound: dict[socket.socket, LocalAddress] = {}
        self.decoded: dict[bytes, LocalAddress] = {}

    def add(self, sock: socket.socket, wildcard: bool) -> None:
        if not wildcard:
            self.bound[sock] = bound_address(sock)

    def remove(self, sock: socket.socket) -> None:
        self.bound.pop(sock, None)

    def of(self, sock: socket.socket, ancdata: list[Ancillary], wildcard: bool) -> LocalAddress:
        if not wildcard:
            return self.bound[sock]
        raw = pktinfo_of(ancdata)
        local = self.decoded.get(raw)
        if local is None:
            local = local_address(ancdata, sock)
            if raw:
                if len(self.decoded) >= LOCAL_CACHE:
                    self.decoded.clear()
                self.decoded[raw] = local
        return local
