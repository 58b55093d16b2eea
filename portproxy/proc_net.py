"""Which local addresses sockets of this network namespace listen on, from ``/proc/net``.

Used once, at exit, to tell whether a created VIP interface is still served by another
process (a newer instance that adopted it during a rolling update) before removing it.
The parsing is pure (``listening_hosts``); ``read_listening_hosts`` reads the files.
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


def listening_hosts(lines: Iterable[str], state: str) -> set[str]:
    """The local IPs of the sockets in ``state`` among the lines of one ``/proc/net`` table
    (its header line included)."""
    hosts: set[str] = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 4 or fields[3] != state or ":" not in fields[1]:
            continue  # the header, or another state
        address = fields[1].rsplit(":", 1)[0]
        try:
            hosts.add(_host(address))
        except ValueError:
            continue
    return hosts


def read_listening_hosts() -> set[str]:
    """Local IPs that TCP listeners or unconnected UDP sockets of this namespace are bound
    to (IPv4-mapped IPv6 ones as IPv4); unreadable tables count as empty."""
    hosts: set[str] = set()
    for name, state in _FILES:
        try:
            with open(f"/proc/net/{name}", encoding="ascii") as table:
                hosts |= listening_hosts(table, state)
        except OSError:
            continue
    unmapped = set()
    for host in hosts:
        ip = ipaddress.ip_address(host)
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        unmapped.add(str(mapped) if mapped is not None else host)
    return unmapped
