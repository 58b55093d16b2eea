"""The rtnetlink event socket behind ``netlink.watch_addresses``: when to look again.

It subscribes to link and address changes and waits until a burst of events may concern
the watched interface. The events only say *when* to re-read the interface; what it looks
like is always a full re-read through pyroute2 in ``netlink.py``. Here only message headers
are read, with the plain stdlib socket, so the caller's event loop (maybe uvloop) can wait
on it directly and this module needs no pyroute2.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

from portproxy.errors import SetupError

# linux/rtnetlink.h: a stable kernel ABI.
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV6_IFADDR = 0x100

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, seq, pid
# ifinfomsg and ifaddrmsg both carry the interface index at offset 4 of their payload.
_INDEX = struct.Struct("=i")
_EVENT_BUFSIZE = 65536
_EVENT_RCVBUF = 1 << 20
"""Receive buffer of the event socket: room for a burst of a few thousand events."""


def relevant(data: bytes, index: int | None) -> bool:
    """Whether a buffer of rtnetlink event messages may change the watched interface.

    Only headers are read (the kernel ABI of nlmsghdr, ifinfomsg and ifaddrmsg); this is a
    filter for busy nodes, where other interfaces come and go all the time, not a parser
    of state.  Anything unexpected counts as relevant.
    """
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind = _NLMSGHDR.unpack_from(data, offset)[:2]
        payload = offset + _NLMSGHDR.size
        if length < _NLMSGHDR.size or payload + 8 > len(data):
            return True  # truncated or malformed: look, to be safe
        msg_index = _INDEX.unpack_from(data, payload + 4)[0]
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            # While the name is unknown any link may be it (created, renamed to it).
            if index is None or msg_index == index:
                return True
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            if msg_index == index:
                return True
        else:
            return True
        offset += (length + 3) & ~3
    return False


def open_event_socket(ipv4: bool, ipv6: bool) -> socket.socket:
    """A non-blocking socket subscribed to link events and the wanted families' address
    events (SetupError if the kernel refuses)."""
    groups = RTMGRP_LINK
    if ipv4:
        groups |= RTMGRP_IPV4_IFADDR
    if ipv6:
        groups |= RTMGRP_IPV6_IFADDR
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _EVENT_RCVBUF)
        sock.bind((0, groups))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot subscribe to netlink address events: {exc.strerror}") from exc
    return sock


async def wait_relevant(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, index: int | None
) -> None:
    """Return once events that may concern ``index`` arrived, having drained the socket,
    so that a burst of events costs one re-read."""
    while True:
        try:
            found = relevant(await loop.sock_recv(sock, _EVENT_BUFSIZE), index)
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            found = True  # events were dropped: only a re-read can tell what changed
        while True:
            try:
                found = relevant(sock.recv(_EVENT_BUFSIZE), index) or found
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                found = True
        if found:
            return
