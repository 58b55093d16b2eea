"""The UDP engine: one flow per client address, relayed over its own connected socket.

Shape (the same surface as ``TcpForwarder``, so the daemon drives both alike):

- Listening sockets are raw non-blocking sockets watched with ``loop.add_reader``; datagrams
  are read with ``recvmsg_into`` into ONE reusable 64 KiB buffer per forward, because the
  ancillary data (PKTINFO, see ``udp_pktinfo``) is out of reach of asyncio's datagram
  transports. Nothing is allocated per datagram beyond a memoryview slice and the tuple
  ``recvmsg_into`` returns: the payload is sent straight from the buffer (UDP sends are
  all-or-nothing into the kernel, so the buffer is free again when ``send`` returns).
- Each flow owns a socket ``connect``-ed to its endpoint (so the kernel filters replies to
  that endpoint and reports ICMP errors on it), also watched with ``add_reader``; replies go
  out of the listening socket the client used, from the address it sent to.
- Flow lifetimes live in ``FlowTable`` (idle expiry, LRU eviction at ``max-flows``) driven by
  ONE timer per forward; traffic never touches the timer.
- ``proxy-protocol=v2``: a ``DGRAM`` header, built once per flow, is sent in front of every
  datagram to the backend with scatter-gather ``sendmsg`` (no copy); replies go without it.
- When the endpoint of a flow disappears from the target, the flow moves to a new endpoint on
  its next datagram from the client (a generation number makes the check O(1)).

Drops are counted in ``portproxy_udp_dropped_total{reason}``; each datagram lost counts once:

=============  ================================================================================
denied         a client outside ``allow`` (checked when a flow would be created)
no_endpoints   no endpoint to create a flow for, or to move a flow to
draining       a new client during drain (existing flows are still served)
refused        the backend answered ICMP port unreachable (the flow and listener live on)
overload       a full socket buffer (EAGAIN/ENOBUFS) either way, or no socket for a new flow
too_big        a datagram plus the PROXY header exceeds the maximum datagram size
error          any other send or receive failure (e.g. no route to the backend)
evicted        counted per FLOW, not per datagram: a flow evicted at ``max-flows``; late
               replies to it are dropped by the kernel
=============  ================================================================================
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from typing import Any

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.flowtable import FlowLimits, FlowTable
from portproxy.metrics import ProxyMetrics
from portproxy.proxyproto import encode_v2
from portproxy.sockets import BindRequest, bind_socket, family_of
from portproxy.spec import Forward, Protocol, ProxyProtocol
from portproxy.target import TargetState
from portproxy.tcp import AccessLog
from portproxy.udp_pktinfo import ANCILLARY_SIZE, LocalAddress, enable, local_address, pktinfo_of

log = logging.getLogger("portproxy.udp")

#: Datagrams read per readiness callback before yielding, so one busy socket cannot starve
#: the rest of the loop (other flows, TCP, the admin endpoint).
BATCH = 64
#: Larger than any UDP payload: 65,507 B over IPv4, 65,527 B over IPv6 (no jumbograms).
RECV_BUFFER = 65536
#: Kernel buffers asked for on listening sockets (capped by net.core.rmem_max/wmem_max):
#: they hold the bursts of every client of the forward, and every reply goes out through them.
LISTENER_BUFFER = 4 * 1024 * 1024
#: Endpoints tried when a flow's socket cannot be created or connected.
CONNECT_ATTEMPTS = 3
#: During drain, a flow silent this long (either way) has no reply in flight any more and is
#: closed; replies later than this would have made a DNS client retry already.
DRAIN_QUIET = 2.0
#: Seconds of tolerance when the expiry timer fires (see ``_on_timer``).
TIMER_SLACK = 0.001

Client = tuple[Any, ...]
"""A client address as ``recvmsg`` returns it: ``(host, port)`` or IPv6's 4-tuple."""


class _Flow:
    """One client address and its connected socket to one endpoint."""

    __slots__ = ("bytes_down", "bytes_up", "client", "endpoint", "generation", "header",
                 "listener", "local", "sock", "started")

    def __init__(self, client: Client, listener: socket.socket, local: LocalAddress,
                 sock: socket.socket, endpoint: Endpoint, started: float) -> None:
        self.client = client
        self.listener = listener
        self.local = local
        self.sock = sock
        self.endpoint = endpoint
        self.started = started
        self.header: bytes | None = None
        self.generation = 0
        self.bytes_up = 0
        self.bytes_down = 0


class UdpForwarder:
    """Receives on one or more listening sockets of a forward and relays flows to its target."""

    def __init__(self, forward: Forward, target: TargetState, metrics: ProxyMetrics,
                 access_log: AccessLog | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.forward = forward
        self.name = forward.name
        self.target = target
        self.access_log = access_log
        options = forward.options
        self.allow = options.allow
        self.proxy_v2 = options.proxy_protocol == ProxyProtocol.V2
        self.idle_timeout = options.idle_timeout_for(Protocol.UDP)
        self.table: FlowTable[Client, _Flow] = FlowTable(
            FlowLimits(self.idle_timeout, options.max_flows), self.loop.time)
        self.listeners: dict[str, socket.socket] = {}
        self.ports: dict[socket.socket, int] = {}
        """The port each listening socket is bound to (the PROXY header's destination port)."""
        self.buffer = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buffer)
        self.accepting = True
        self.draining = False
        self._timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.generation = 0
        self.endpoint_keys = frozenset(e.key for e in target.endpoints.endpoints)
        target.on_change(self._endpoints_changed)
        self._metrics(metrics)

    def _metrics(self, metrics: ProxyMetrics) -> None:
        name = self.name
        self.g_flows = metrics.udp_flows.labels(name)
        self.d_up = metrics.udp_datagrams.labels(name, "upstream")
        self.d_down = metrics.udp_datagrams.labels(name, "downstream")
        self.bytes_up = metrics.bytes.labels(name, "upstream")
        self.bytes_down = metrics.bytes.labels(name, "downstream")
        drop = metrics.udp_dropped
        self.x_denied = drop.labels(name, "denied")
        self.x_no_endpoints = drop.labels(name, "no_endpoints")
        self.x_draining = drop.labels(name, "draining")
        self.x_refused = drop.labels(name, "refused")
        self.x_overload = drop.labels(name, "overload")
        self.x_too_big = drop.labels(name, "too_big")
        self.x_error = drop.labels(name, "error")
        self.x_evicted = drop.labels(name, "evicted")

    # -- listeners ------------------------------------------------------------------------
    def add_listener(self, host: str, freebind: bool = False) -> None:
        """Bind ``host`` ('' = all addresses) on the forward's port and start receiving."""
        if host in self.listeners:
            return
        request = BindRequest(host, self.forward.listen.port, socket.SOCK_DGRAM, freebind)
        sock = bind_socket(request, self.name)
        try:
            enable(sock)
            _set_buffers(sock, LISTENER_BUFFER)
        except OSError:
            sock.close()
            raise
        self.listeners[host] = sock
        self.ports[sock] = sock.getsockname()[1]
        self.loop.add_reader(sock.fileno(), self._on_datagram, sock)
        log.info("forward %s: listening on udp %s", self.name, _where(sock),
                 extra={"forward": self.name})

    def remove_listener(self, host: str) -> None:
        """Stop receiving on ``host``; its flows cannot answer any more and are closed."""
        sock = self.listeners.pop(host, None)
        if sock is None:
            return
        for client, flow in self.table.items():
            if flow.listener is sock:
                self.table.remove(client)
                self._close(flow, "listener_removed")
        self.loop.remove_reader(sock.fileno())
        del self.ports[sock]
        sock.close()
        log.info("forward %s: stopped listening on udp %s", self.name, host or "*")

    @property
    def bound(self) -> bool:
        return bool(self.listeners)

    @property
    def flows(self) -> int:
        return len(self.table)

    @property
    def active(self) -> int:
        """Same as ``flows``: the name the daemon uses for both engines."""
        return len(self.table)

    # -- client → backend -----------------------------------------------------------------
    def _on_datagram(self, lsock: socket.socket) -> None:
        buffers = (self.buffer,)
        table = self.table
        for _ in range(BATCH):
            try:
                size, ancdata, _flags, client = lsock.recvmsg_into(buffers, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.x_error.inc()
                continue
            flow = table.get(client)
            if flow is None:
                flow = self._new_flow(lsock, client, ancdata)
                if flow is None:
                    continue
            else:
                if flow.listener is not lsock or pktinfo_of(ancdata) != flow.local.raw:
                    self._relocate(flow, lsock, ancdata)
                if flow.generation != self.generation and not self._endpoint_ok(flow):
                    continue
            if self._send_up(flow, size):
                flow.bytes_up += size
                self.d_up.inc()
                self.bytes_up.inc(size)

    def _send_up(self, flow: _Flow, size: int) -> bool:
        data = self.view[:size]
        for _ in range(2):
            try:
                if flow.header is None:
                    flow.sock.send(data)
                else:
                    flow.sock.sendmsg((flow.header, data))
                return True
            except ConnectionRefusedError:
                # An earlier datagram drew ICMP port unreachable; the kernel reports it on
                # this send (and clears it) instead of sending: count it, try again once.
                self._refused(flow)
            except OSError as exc:
                self._send_failed(exc)
                return False
        return False

    def _send_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM):
            self.x_overload.inc()
        elif exc.errno == errno.EMSGSIZE:
            self.x_too_big.inc()
        else:
            self.x_error.inc()

    def _refused(self, flow: _Flow) -> None:
        self.x_refused.inc()
        log.warning("forward %s: backend %s refused a datagram (ICMP port unreachable)",
                    self.name, flow.endpoint,
                    extra={"forward": self.name, "endpoint": str(flow.endpoint)})

    # -- flows ------------------------------------------------------------------------------
    def _new_flow(self, lsock: socket.socket, client: Client,
                  ancdata: list[tuple[int, int, bytes]]) -> _Flow | None:
        if not self.accepting:
            self.x_draining.inc()
            return None
        if self.allow and not self._allowed(client[0]):
            self.x_denied.inc()
            return None
        connected = self._connect(client)
        if connected is None:
            return None
        sock, endpoint = connected
        local = local_address(ancdata, lsock)
        flow = _Flow(client, lsock, local, sock, endpoint, self.loop.time())
        flow.generation = self.generation
        flow.header = self._header(flow)
        self._admit(flow)
        return flow

    def _allowed(self, host: str) -> bool:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allow)

    def _connect(self, client: Client) -> tuple[socket.socket, Endpoint] | None:
        """A socket connected to the first usable candidate endpoint (counted when none)."""
        candidates = self.target.candidates(_unmapped(client[0]))
        if not candidates:
            self.x_no_endpoints.inc()
            return None
        for endpoint in candidates[:CONNECT_ATTEMPTS]:
            try:
                sock = socket.socket(family_of(endpoint.host), socket.SOCK_DGRAM)
            except OSError:  # out of file descriptors or memory: a flood; shed it
                self.x_overload.inc()
                return None
            try:
                sock.setblocking(False)
                sock.connect((endpoint.host, endpoint.port))  # no handshake: never blocks
            except OSError:
                sock.close()
                continue
            return sock, endpoint
        self.x_error.inc()
        return None

    def _header(self, flow: _Flow) -> bytes | None:
        if not self.proxy_v2:
            return None
        return encode_v2(flow.client, (flow.local.host, self.ports[flow.listener]), "dgram")

    def _admit(self, flow: _Flow) -> None:
        evictions = self.table.evictions
        removed = self.table.add(flow.client, flow)
        if removed is not None:
            evicted = self.table.evictions != evictions
            if evicted:
                self.x_evicted.inc()
                log.warning("forward %s: max-flows %d reached; evicting the least recently "
                            "active flow", self.name, self.table.limits.max_flows,
                            extra={"forward": self.name})
            self._close(removed[1], "evicted" if evicted else "expired")
        self.loop.add_reader(flow.sock.fileno(), self._on_reply, flow)
        self.target.opened(flow.endpoint)
        self.g_flows.inc()
        self._idle.clear()
        self._arm()

    def _relocate(self, flow: _Flow, lsock: socket.socket,
                  ancdata: list[tuple[int, int, bytes]]) -> None:
        """The client now sends to another local address: answer from that one."""
        flow.listener = lsock
        flow.local = local_address(ancdata, lsock)
        flow.header = self._header(flow)

    def _endpoints_changed(self, endpoints: EndpointSet) -> None:
        self.generation += 1
        self.endpoint_keys = frozenset(e.key for e in endpoints.endpoints)

    def _endpoint_ok(self, flow: _Flow) -> bool:
        """After an endpoint change: keep the flow's endpoint, or move it to a new one."""
        if flow.endpoint.key in self.endpoint_keys:
            flow.generation = self.generation
            return True
        connected = self._connect(flow.client)
        if connected is None:
            self.table.remove(flow.client)
            self._close(flow, "no_endpoints")
            return False
        old = flow.endpoint
        self.loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        self.target.closed(old)
        flow.sock, flow.endpoint = connected
        flow.generation = self.generation
        self.target.opened(flow.endpoint)
        self.loop.add_reader(flow.sock.fileno(), self._on_reply, flow)
        log.info("forward %s: flow of %s moved from %s to %s (endpoint gone)", self.name,
                 _host_port(flow.client), old, flow.endpoint, extra={"forward": self.name})
        return True

    def _close(self, flow: _Flow, result: str) -> None:
        """Release a flow already removed from the table."""
        self.loop.remove_reader(flow.sock.fileno())
        flow.sock.close()
        self.target.closed(flow.endpoint)
        self.g_flows.dec()
        if self.access_log is not None:
            self.access_log(self.name, _host_port(flow.client), str(flow.endpoint),
                            flow.bytes_up, flow.bytes_down, self.loop.time() - flow.started,
                            result)
        if not self.table:
            self._idle.set()

    # -- backend → client -----------------------------------------------------------------
    def _on_reply(self, flow: _Flow) -> None:
        sock, view = flow.sock, self.view
        sent = 0
        for _ in range(BATCH):
            try:
                size = sock.recv_into(self.buffer)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                self._refused(flow)  # ICMP port unreachable; the flow stays
                continue
            except OSError:
                self.x_error.inc()
                break
            try:
                flow.listener.sendmsg((view[:size],), flow.local.reply, 0, flow.client)
            except OSError as exc:
                self._send_failed(exc)
                continue
            sent += 1
            flow.bytes_down += size
            self.bytes_down.inc(size)
        if sent:
            self.d_down.inc(sent)
            self.table.touch(flow.client)

    # -- expiry -----------------------------------------------------------------------------
    def _arm(self) -> None:
        if self._timer is None:
            deadline = self._next_deadline()
            if deadline is not None:
                self._timer = self.loop.call_at(deadline, self._on_timer)

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._arm()

    def _quiet_shift(self) -> float:
        """How much earlier than the idle timeout a draining flow ends: expiring at
        ``now + shift`` ends the flows quiet for ``min(idle_timeout, DRAIN_QUIET)``."""
        return self.idle_timeout - min(self.idle_timeout, DRAIN_QUIET)

    def _next_deadline(self) -> float | None:
        if self.draining and not self.idle_timeout:
            # Flows never expire, so the table has no deadlines: look again periodically.
            return self.loop.time() + DRAIN_QUIET / 2 if self.table else None
        deadline = self.table.next_deadline()
        if deadline is None or not self.draining:
            return deadline
        return deadline - self._quiet_shift()

    def _on_timer(self) -> None:
        self._timer = None
        # The loop may run a timer up to its clock resolution early; a flow ending a
        # millisecond early is harmless, re-arming for the same instant in a spin is not.
        now = self.loop.time() + TIMER_SLACK
        if not self.draining:
            expired, result = self.table.expire(now), "expired"
        elif self.idle_timeout:
            expired, result = self.table.expire(now + self._quiet_shift()), "drained"
        else:
            expired, result = self._quiet_flows(now), "drained"
        for _, flow in expired:
            self._close(flow, result)
        self._arm()

    def _quiet_flows(self, now: float) -> list[tuple[Client, _Flow]]:
        """Draining without an idle timeout: remove the flows quiet for ``DRAIN_QUIET``."""
        quiet = []
        for client in self.table:  # least recently active first
            last = self.table.last_active(client)
            if last is None or last + DRAIN_QUIET > now:
                break
            flow = self.table.remove(client)
            if flow is not None:
                quiet.append((client, flow))
        return quiet

    # -- stopping -------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """No new flows from now on. The listening sockets stay open: existing flows'
        replies leave through them until ``drain`` or ``abort_all`` closes them."""
        self.accepting = False

    async def drain(self, timeout: float) -> None:
        """Serve existing flows until each has been quiet for ``DRAIN_QUIET`` seconds (or
        its idle timeout, if shorter), for at most ``timeout`` seconds; then close all."""
        self.stop_accepting()
        self.draining = True
        self._rearm()
        if self.table:
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                pass
        self.abort_all()

    def abort_all(self) -> None:
        """Close every flow and every listening socket now."""
        self.accepting = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for _, flow in self.table.clear():
            self._close(flow, "drain_timeout")
        for host in list(self.listeners):
            self.remove_listener(host)


def _set_buffers(sock: socket.socket, size: int) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, size)


def _unmapped(host: str) -> str:
    """``::ffff:a.b.c.d`` → ``a.b.c.d``, so source-ip balancing sees one client identity."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def _host_port(client: Client) -> tuple[str, int]:
    """For logs: the client as it would be written by a user (IPv4 clients unmapped)."""
    return (_unmapped(client[0]), client[1])


def _where(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
