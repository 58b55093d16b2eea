"""Connecting one accepted client to a backend: non-blocking connect, timeout, retries.

A small state machine on loop callbacks (no task per connection): each endpoint of the
balancer's order is tried in turn, within the retry budget, and the owner (the TCP engine)
is told of every failed attempt, the final failure or the connected socket.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import struct
import time
from typing import Protocol

from portproxy.deadlines import Deadlines, Slot
from portproxy.endpoints import Endpoint
from portproxy.poller import Poller
from portproxy.sockets import RESOURCE_ERRNOS, family_of, sockaddr, tune_stream
from portproxy.target import TargetState

Address = tuple[str, int]
_LINGER_RESET = struct.pack("ii", 1, 0)


class ConnectOwner(Protocol):
    loop: asyncio.AbstractEventLoop
    poller: Poller
    deadlines: Deadlines
    connect_timeout: float
    target: TargetState

    def on_connected(self, attempt: BackendConnect) -> None: ...

    def on_connect_failed(self, attempt: BackendConnect) -> None: ...

    def on_attempt_failed(self, attempt: BackendConnect, endpoint: Endpoint, err: int) -> None:
        ...

    def retry_after_backoff(self, attempt: BackendConnect) -> None: ...

    def on_client_gone(self, attempt: BackendConnect) -> None: ...


def reset_close(sock: socket.socket) -> None:
    """Close with RST: the client learns at once that nothing will be served."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


def client_ip(address: Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class BackendConnect:
    """Connecting one accepted client to a backend, trying endpoints in order."""

    __slots__ = ("accepted", "attempts", "client", "client_addr", "deadline", "endpoint",
                 "engine", "last_error", "sock", "started")

    def __init__(
        self, engine: ConnectOwner, client: socket.socket, client_addr: Address,
        attempts: list[Endpoint],
    ) -> None:
        self.engine = engine
        self.client = client
        self.client_addr = client_addr
        self.attempts = attempts
        self.sock: socket.socket | None = None
        self.endpoint: Endpoint | None = None
        self.deadline: Slot | None = None
        self.accepted = engine.loop.time()
        """When the client was accepted (the loop's clock): its access log duration."""
        self.started = 0.0
        self.last_error = 0

    def next(self) -> None:
        engine = self.engine
        if not self.attempts:
            engine.on_connect_failed(self)
            return
        endpoint = self.endpoint = self.attempts.pop(0)
        try:
            address = sockaddr(endpoint.host, endpoint.port)
            # SOCK_NONBLOCK at creation: one ioctl fewer than setblocking(False).
            sock = socket.socket(family_of(endpoint.host),
                                 socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            self.last_error = exc.errno or errno.EMFILE
            engine.on_attempt_failed(self, endpoint, self.last_error)
            if self.last_error in RESOURCE_ERRNOS:
                # Out of descriptors or memory: no endpoint can help now. The engine backs
                # off and tries this endpoint again after it; the client waits meanwhile,
                # as those still in the accept queue do.
                self.attempts.insert(0, endpoint)
                engine.retry_after_backoff(self)
            else:
                # This endpoint's family, e.g. IPv6 on a kernel without it (EAFNOSUPPORT):
                # the next endpoint may well be reachable.
                self.next()
            return
        self.sock = sock
        # Counted from here, not from the answer: least-conn must see connects in flight,
        # or a burst all goes to the endpoint that looked emptiest (HAProxy counts a
        # connection from the moment a server is picked). The relay keeps the count.
        engine.target.opened(endpoint)
        tune_stream(sock)
        now = engine.loop.time()
        # Not the loop's clock: uvloop's is cached to the millisecond, which would put every
        # loopback connect into the histogram's first bucket as 0.
        self.started = time.monotonic()
        err = sock.connect_ex(address)
        if err == 0:
            engine.on_connected(self)
        elif err == errno.EINPROGRESS:
            engine.poller.add_writer(sock.fileno(), self._on_writable)
            self.deadline = engine.deadlines.add(now + engine.connect_timeout, self,
                                                 self._on_timeout)
        else:
            self._failed(err)

    def _on_writable(self) -> None:
        assert self.sock is not None
        if self.deadline is not None:
            self.engine.deadlines.remove(self.deadline, self)
            self.deadline = None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._failed(err)
        else:
            # The relay registers this socket as a reader next: one epoll_ctl, not two.
            self.engine.poller.take_writer(self.sock.fileno())
            self.engine.on_connected(self)

    def _on_timeout(self) -> None:
        self.deadline = None
        self._failed(errno.ETIMEDOUT)

    def _failed(self, err: int) -> None:
        assert self.sock is not None and self.endpoint is not None
        self.engine.poller.discard(self.sock.fileno())
        self.sock.close()
        self.sock = None
        self.engine.target.closed(self.endpoint)
        self.last_error = err
        self.engine.on_attempt_failed(self, self.endpoint, err)
        self.next_unless_client_gone()

    def next_unless_client_gone(self) -> None:
        """Try the next endpoint, unless the client reset meanwhile (it gave up on a slow
        backend): then the attempt ends here, rather than after every endpoint's connect
        timeout. Asked only when an attempt moves on, so the usual connect costs nothing
        (watching every waiting client in epoll would cost a system call each)."""
        if self.client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.engine.on_client_gone(self)
        else:
            self.next()

    def cancel(self) -> None:
        if self.deadline is not None:
            self.engine.deadlines.remove(self.deadline, self)
            self.deadline = None
        if self.sock is not None:  # connecting: never counted by a relay
            self.engine.poller.discard(self.sock.fileno())
            self.sock.close()
            if self.endpoint is not None:
                self.engine.target.closed(self.endpoint)
        reset_close(self.client)  # never in the poller: the relay registers it
