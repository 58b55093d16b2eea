"""Listening and connecting sockets with the options a forwarder needs.

Listeners: SO_REUSEADDR (restart without TIME_WAIT trouble), SO_REUSEPORT (a second
instance — a worker or the next pod of a rolling DaemonSet — binds beside this one; the
kernel still refuses a port held by another user's socket), optional IP_FREEBIND (bind an
address that does not exist yet), dual-stack ``[::]`` for "all addresses" (a written ``[::]``
is IPv6 only).
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any

from portproxy.errors import BindError

#: Listen backlog: the kernel caps it at net.core.somaxconn (4096 on current kernels); a deep
#: queue absorbs connection bursts while max-conns pauses accepting.
BACKLOG = 4096
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = 78
TCP_KEEPIDLE_SECONDS = 60


@dataclass(frozen=True, slots=True)
class BindRequest:
    host: str
    """IP literal, or '' for all addresses (dual-stack when IPv6 exists)."""
    port: int
    kind: int = socket.SOCK_STREAM
    freebind: bool = False
    reuseport: bool = True
    listen: bool = True
    """TCP: call listen() now. A bound socket that does not listen yet receives nothing, not
    even as a member of a SO_REUSEPORT group, yet the port is already reserved."""


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return False
    return True


#: Failures that are this process's or this host's limits (descriptors, memory), not an
#: endpoint's: another endpoint cannot help, and the endpoint is not to blame.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def unmapped(host: str) -> str:
    """``::ffff:a.b.c.d`` → ``a.b.c.d``: an IPv4 client of a dual-stack socket has one
    identity, whichever way it arrived, for balancing (source-ip) and logs."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def log_address(client: tuple[Any, ...]) -> tuple[str, int]:
    """A client address as a user would write it (IPv4 clients of dual-stack sockets
    unmapped), for the access log of both protocols."""
    return (unmapped(client[0]), client[1])


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_socket(request: BindRequest, forward: str) -> socket.socket:
    """Bind (and for TCP, listen); errors become one clear ``BindError`` line (a ``SetupError``)."""
    host = request.host
    if host == "":
        host = "::" if _ipv6_available() else "0.0.0.0"
    family = family_of(host)
    try:
        sock = socket.socket(family, request.kind)
    except OSError as exc:  # an IPv6 address on a kernel without IPv6; out of descriptors
        raise BindError(bind_error_message(forward, host, request.port, exc, request.kind),
                        exc.errno) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if request.reuseport and hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host == "::":
            # All addresses ('' or '*') is dual-stack; a written [::] is every IPv6 address
            # only (nginx's ipv6only=on), so that 0.0.0.0:P and [::]:P split the families.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if request.host == "" else 1)
        if request.freebind:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind(sockaddr(host, request.port))
        if request.kind == socket.SOCK_STREAM:
            # Accepted sockets inherit these on Linux: set once here, not per connection.
            tune_stream(sock)
            if request.listen:
                sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(bind_error_message(forward, host, request.port, exc, request.kind),
                        exc.errno) from None
    return sock


def host_port(host: str, port: int) -> str:
    """``host:port``, or ``[v6]:port`` for an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_dual_stack(sock: socket.socket) -> bool:
    """Whether ``sock`` is the IPv6 wildcard that also takes IPv4 clients (all addresses)."""
    return (sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::"
            and not sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))


def bind_error_message(forward: str, host: str, port: int, exc: OSError,
                       kind: int = socket.SOCK_STREAM) -> str:
    where = host_port(host, port)
    if exc.errno == errno.EADDRINUSE:
        # Which protocol: on a tcp+udp forward the other one may well be free, and the
        # command to find the holder differs (ss -ltnp or ss -lunp).
        protocol = "udp" if kind == socket.SOCK_DGRAM else "tcp"
        return (f"forward {forward}: {protocol} {where} is already in use by another program "
                f"(ss -l{protocol[0]}np shows it); stop it or choose another port")
    if exc.errno == errno.EACCES:
        return (f"forward {forward}: permission denied binding {where}; ports below 1024 need "
                "CAP_NET_BIND_SERVICE (or root)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"forward {forward}: {where} is not an address of this host; use an interface "
                "name, '*' or the freebind option")
    if exc.errno == errno.EAFNOSUPPORT:
        return (f"forward {forward}: cannot bind {where}: this kernel has no IPv6; use an IPv4 "
                "address or '*'")
    return f"forward {forward}: cannot bind {where}: {exc.strerror or exc}"


def tune_stream(sock: socket.socket) -> None:
    """TCP_NODELAY (we forward, we don't batch), keepalive to notice dead peers, and urgent
    data read in line: without SO_OOBINLINE a read steps over the urgent byte and it would
    be lost. Set on a listener, these are inherited by every socket it accepts."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, TCP_KEEPIDLE_SECONDS)


def sockaddr(host: str, port: int) -> tuple[str, int] | tuple[str, int, int, int]:
    """The address tuple for bind/connect. An IPv6 zone (``fe80::1%eth0`` or ``%2``) becomes
    the scope id of a 4-tuple: Python's 2-tuple form drops it, so the kernel would refuse a
    link-local address (EINVAL). OSError(ENODEV) names a zone that is no interface."""
    if "%" not in host:
        return (host, port)
    address, zone = host.split("%", 1)
    if zone.isdecimal():
        return (address, port, 0, int(zone))
    try:
        return (address, port, 0, socket.if_nametoindex(zone))
    except OSError:
        raise OSError(errno.ENODEV, f"no interface named {zone!r} (the address's zone)"
                      ) from None


def bound_address(sock: socket.socket) -> str:
    """A bound socket's address for logs: ``host:port``, ``[v6]:port`` (``[fe80::1%eth0]``
    with its zone), or ``*:port`` for the dual-stack wildcard (``[::]:port`` is the
    IPv6-only one)."""
    address = sock.getsockname()
    host, port = address[:2]
    if len(address) == 4 and address[3]:  # a link-local address's interface
        try:
            host = f"{host}%{socket.if_indextoname(address[3])}"
        except OSError:  # the interface is gone already
            host = f"{host}%{address[3]}"
    return f"*:{port}" if is_dual_stack(sock) else host_port(host, port)
