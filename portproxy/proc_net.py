"""Which local addresses and ports sockets of this network namespace listen on, from
``/proc/net``.

Used once, at exit, to tell whether a created VIP interface is still served by another
process (a newer instance that adopted it during a rolling update) before removing it.
The parsing is pure (``listening``); ``read_listening`` reads the files.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"  # a UDP socket that is bound but not connected (a listener)
_FILES = (("tcp", _TCP_LISTEN), ("tcp6", _TCP_LISTEN), ("udp", _UDP_UNCONNECTED),
          ("udp6", _UDP_UNCONNECTED))


def _host(hex_address: str) -> str:
    """``/proc/net`` address hex (each 32-bit word in host order) → canonical IP text."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) \
        if socket.htonl(1) != 1 else raw  # little-endian hosts store each word reversed
    return str(ipaddress.ip_address(words))


def listening(lines: Iterable[str], state: str) -> set[tuple[str, int]]:
    """The local (IP, port) of the sockets in ``state`` among the lines of one
    ``/proc/net`` table (its header line included)."""
    found: set[tuple[str, int]] = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[3] != state or ":" not in fields[1]:
            continue  # the header, or another state
        address, _, port = fields[1].rpartition(":")
        try:
            found.add((_host(address), int(port, 16)))
        except ValueError:
            continue
    return found


def read_listening() -> set[tuple[str, int]]:
    """(IP, port) of the TCP listeners and unconnected UDP sockets of this namespace
    (IPv4-mapped IPv6 addresses as IPv4); unreadable tables count as empty."""
    found: set[tuple[str, int]] = set()
    for name, state in _FILES:
        try:
            with open(f"/proc/net/{name}", encoding="ascii") as table:
                found |= listening(table, state)
        except OSError:
            continue
    unmapped = set()
    for host, port in found:
        ip = ipaddress.ip_address(host)
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        unmapped.add((str(mapped) if mapped is not None else host, port))
    return unmapped
