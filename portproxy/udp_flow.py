"""UDP flows: the per-client state, the one expiry timer of a forward, and small helpers.

``FlowExpiry`` turns ``FlowTable``'s deadlines into ONE ``loop.call_at`` timer per forward
(never one per flow or per datagram): it is armed when a flow is added and re-armed from
``next_deadline`` after each expiry, and traffic never touches it, because activity only
moves deadlines later; a timer that fires for a flow refreshed meanwhile expires nothing and
re-arms at the new front's deadline.

Draining: a flow silent for ``DRAIN_QUIET`` seconds (or its idle timeout, if shorter) has no
reply in flight any more and ends; that is ``expire(now + shift)`` with ``shift = idle_timeout
- quiet``, so the table needs no second ordering. Without an idle timeout (0 = never) the table
has no deadlines, and draining walks the least recently active flows periodically instead.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import select
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from portproxy.endpoints import Endpoint
from portproxy.flowtable import FlowTable
from portproxy.metrics import Counter, Gauge, ProxyMetrics
from portproxy.sockets import RESOURCE_ERRNOS, family_of, sockaddr
from portproxy.spec import IPNetwork
from portproxy.udp_pktinfo import Ancillary, LocalAddress, enable_drop_count, kernel_drops

log = logging.getLogger("portproxy.udp")

#: During drain, a flow silent this long (either way) has no reply in flight any more and is
#: closed; a reply later than this would have made a DNS client retry already.
DRAIN_QUIET = 2.0
#: The loop may run a timer up to its clock resolution early; expiring a flow a millisecond
#: early is harmless, re-arming for the same instant in a spin is not.
TIMER_SLACK = 0.001
#: Receive buffer asked for on each flow socket (capped by net.core.rmem_max): room for a
#: burst of replies of the largest size; it is a cap, memory is only used while queued.
FLOW_BUFFER = 1024 * 1024
#: Seconds between warnings about flows evicted at max-flows.
EVICTION_LOG_INTERVAL = 10.0

Client = tuple[Any, ...]
"""A client address as ``recvmsg`` returns it: ``(host, port)`` or IPv6's 4-tuple."""


class Flow:
    """One client address and its connected socket to one endpoint."""

    __slots__ = ("awaiting", "bytes_down", "bytes_up", "client", "drops", "endpoint",
                 "generation", "header", "listener", "local", "owner", "sock", "started")

    def __init__(self, owner: Any, client: Client, listener: socket.socket,
                 local: LocalAddress, sock: socket.socket, endpoint: Endpoint,
                 started: float) -> None:
        self.owner = owner
        """The engine whose table holds it (a draining predecessor may receive its
        client's datagrams: the owner relays and counts them)."""
        self.client = client
        self.listener = listener
        """The listening socket the client sent to: replies leave through it."""
        self.local = local
        self.sock = sock
        self.endpoint = endpoint
        self.started = started
        self.header: bytes | None = None
        """The PROXY v2 header sent in front of every datagram (built once per flow)."""
        self.generation = 0
        """The engine's endpoint generation when ``endpoint`` was last known to exist."""
        self.bytes_up = 0
        self.bytes_down = 0
        self.drops = 0
        """The kernel's count of replies dropped on ``sock`` already counted as overload."""
        self.awaiting = 0
        """With ``responses=N``: replies still expected (N per datagram sent, less each
        reply received); the flow ends when it drops to 0."""


Expired = list[tuple[Client, Flow]]
#: Flow sockets handled per readiness callback of the poller.
POLL_EVENTS = 256
#: Replies read from one flow socket per callback once it is known to hold several.
REPLY_BATCH = 64


class FlowPoller:
    """The flow sockets of one forward in an epoll set of their own, watched by the loop as
    ONE file descriptor.

    Why not ``loop.add_reader`` per flow socket: an ICMP error puts a connected UDP socket in
    an error state that epoll reports as EPOLLERR, and libuv (under uvloop, which the CLI
    prefers) stops watching a polled descriptor for good on EPOLLERR, so the flow would
    never see another reply. Here EPOLLERR simply makes the flow's reader run, whose
    ``recvmsg`` collects the error (ECONNREFUSED: see ``UdpForwarder._on_reply``). It is
    also cheaper: registering a flow is one ``epoll_ctl``, and one loop callback serves
    every ready flow.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 on_ready: Callable[[Flow, int], None]) -> None:
        self.loop = loop
        self.on_ready = on_ready
        self.epoll = select.epoll()
        self.flows: dict[int, Flow] = {}
        loop.add_reader(self.epoll.fileno(), self._on_ready)

    def add(self, flow: Flow) -> None:
        fd = flow.sock.fileno()
        self.flows[fd] = flow
        self.epoll.register(fd, select.EPOLLIN)

    def remove(self, flow: Flow) -> None:
        """Forget ``flow``; call just before closing its socket. No ``epoll_ctl(DEL)``:
        closing the socket takes it out of the set (its only descriptor: flow sockets are
        never duplicated, and child processes are started with fork+exec, closing them),
        which saves a syscall per flow, a tenth of a one-shot query's cost."""
        self.flows.pop(flow.sock.fileno(), None)

    def _on_ready(self) -> None:
        # Most ready flows hold one reply (a request was relayed, its answer came back):
        # reading each until EAGAIN would cost a failed recvmsg (a syscall and an exception)
        # per reply. So the first pass reads one datagram per flow, and a second poll, one
        # syscall for all of them, finds the flows that had more, which are then drained in
        # batches. The set is level-triggered: whatever is left is reported again.
        flows, on_ready = self.flows, self.on_ready
        batch = 1
        for _ in range(2):
            events = self.epoll.poll(0, POLL_EVENTS)
            for fd, _events in events:
                flow = flows.get(fd)
                if flow is not None:  # None: closed by an earlier callback in this batch
                    on_ready(flow, batch)
            if not events:
                return
            batch = REPLY_BATCH

    def close(self) -> None:
        if not self.epoll.closed:
            self.loop.remove_reader(self.epoll.fileno())
            self.epoll.close()
        self.flows.clear()


class UdpCounters:
    """One forward's metric children, looked up once so the data path only adds numbers.

    Drops are counted in ``portproxy_udp_dropped_total{reason}``; each datagram lost counts once:

    =============  ================================================================================
    denied         a client outside ``allow`` (checked when a flow would be created)
    no_endpoints   no endpoint to create a flow for, or to move a flow to
    draining       a new client during drain (existing flows are still served)
    refused        the backend answered ICMP port unreachable (the listener lives on; the flow
                   moves to an endpoint that answers; with responses=N, it ends once it
                   awaits no reply)
    overload       a full socket buffer either way: the kernel's own count of datagrams dropped on
                   a full listener or flow socket (SO_RXQ_OVFL), EAGAIN/ENOBUFS on send; or no
                   socket for a new flow
    too_big        a datagram plus the PROXY header exceeds the maximum datagram size
    error          any other send or receive failure (e.g. no route to the backend)
    evicted        counted per FLOW, not per datagram: a flow evicted at ``max-flows``; late
                   replies to it are dropped by the kernel
    =============  ================================================================================
    """

    def __init__(self, metrics: ProxyMetrics, name: str) -> None:
        self.flows: Gauge = metrics.udp_flows.labels(name)
        self.datagrams_up: Counter = metrics.udp_datagrams.labels(name, "upstream")
        self.datagrams_down: Counter = metrics.udp_datagrams.labels(name, "downstream")
        self.bytes_up: Counter = metrics.bytes.labels(name, "upstream")
        self.bytes_down: Counter = metrics.bytes.labels(name, "downstream")
        drop = metrics.udp_dropped
        self.denied: Counter = drop.labels(name, "denied")
        self.no_endpoints: Counter = drop.labels(name, "no_endpoints")
        self.draining: Counter = drop.labels(name, "draining")
        self.refused: Counter = drop.labels(name, "refused")
        self.overload: Counter = drop.labels(name, "overload")
        self.too_big: Counter = drop.labels(name, "too_big")
        self.error: Counter = drop.labels(name, "error")
        self.evicted: Counter = drop.labels(name, "evicted")
        self.name = name
        self.unlogged_evictions = 0
        self.next_eviction_log = 0.0

    def kernel_drops(self, seen: int, ancdata: list[Ancillary]) -> int:
        """Count as overload what a socket's kernel drop count (SO_RXQ_OVFL) grew by since
        ``seen``; returns the new count to remember."""
        total = kernel_drops(ancdata)
        if total <= seen:
            return seen
        self.overload.value += total - seen
        return total

    def send_failed(self, exc: OSError) -> None:
        if exc.errno in (errno.EAGAIN, errno.ENOBUFS, errno.ENOMEM):
            self.overload.value += 1
        elif exc.errno == errno.EMSGSIZE:
            self.too_big.value += 1
        else:
            self.error.value += 1

    def refused_by(self, endpoint: Endpoint) -> None:
        self.refused.value += 1
        log.warning("forward %s: backend %s refused a datagram (ICMP port unreachable)",
                    self.name, endpoint, extra={"forward": self.name, "endpoint": str(endpoint)})

    def evicted_one(self, now: float, max_flows: int) -> None:
        """Count a flow evicted at max-flows; warn at most every ``EVICTION_LOG_INTERVAL``
        s, because a flood at the limit evicts a flow per datagram and a log line each would
        cost more than the datagram (the metric counts every one)."""
        self.evicted.value += 1
        self.unlogged_evictions += 1
        if now < self.next_eviction_log:
            return
        self.log_evictions(max_flows)
        self.next_eviction_log = now + EVICTION_LOG_INTERVAL

    def log_evictions(self, max_flows: int) -> None:
        """Warn of the evictions not yet in the log (also when the forward stops: those of
        its last interval would otherwise never be said)."""
        if self.unlogged_evictions:
            log.warning("forward %s: max-flows %d reached; evicted %d least recently active "
                        "flow(s)", self.name, max_flows, self.unlogged_evictions,
                        extra={"forward": self.name})
            self.unlogged_evictions = 0


class FlowExpiry:
    """The single expiry timer of one forward's flow table."""

    def __init__(self, loop: asyncio.AbstractEventLoop, table: FlowTable[Client, Flow],
                 idle_timeout: float, close: Callable[[Flow, str], None]) -> None:
        self.loop = loop
        self.table = table
        self.idle_timeout = idle_timeout
        self.close = close
        self.draining = False
        self._timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        """Make sure the timer runs for the earliest deadline (after adding a flow)."""
        if self._timer is None:
            deadline = self._next_deadline()
            if deadline is not None:
                self._timer = self.loop.call_at(deadline, self._on_timer)

    def start_draining(self) -> None:
        """From now on flows end once quiet for ``DRAIN_QUIET`` seconds."""
        self.draining = True
        self.cancel()
        self.arm()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _shift(self) -> float:
        return self.idle_timeout - min(self.idle_timeout, DRAIN_QUIET)

    def _next_deadline(self) -> float | None:
        if self.draining and not self.idle_timeout:
            return self.loop.time() + DRAIN_QUIET / 2 if self.table else None
        deadline = self.table.next_deadline()
        if deadline is None or not self.draining:
            return deadline
        return deadline - self._shift()

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time() + TIMER_SLACK
        if not self.draining:
            expired, result = self.table.expire(now), "expired"
        elif self.idle_timeout:
            expired, result = self.table.expire(now + self._shift()), "drained"
        else:
            expired, result = self._quiet_flows(now), "drained"
        for _, flow in expired:
            self.close(flow, result)
        self.arm()

    def _quiet_flows(self, now: float) -> Expired:
        quiet = []
        for client in self.table:  # least recently active first
            last = self.table.last_active(client)
            if last is None or last + DRAIN_QUIET > now:
                break
            flow = self.table.remove(client)
            if flow is not None:
                quiet.append((client, flow))
        return quiet


def table_clock(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """The flow table's clock, read twice per round trip: asyncio's own ``loop.time`` is a
    Python function around ``time.monotonic``, so take the latter directly (one frame less
    per read); other loops (uvloop keeps its own cached clock) keep ``loop.time``."""
    if type(loop).time is asyncio.BaseEventLoop.time:
        return time.monotonic
    return loop.time


#: What ``connect`` on a UDP socket fails with when no ephemeral port is left to bind it to
#: (the kernel's autobind). Unlike TCP's, UDP's ephemeral ports are not per destination,
#: so no other endpoint would do better. (EADDRNOTAVAIL, no source address of the
#: endpoint's family, concerns that endpoint only: the next one is tried.)
NO_LOCAL_PORT_ERRNOS = frozenset({errno.EAGAIN})


def connect_first(endpoints: Sequence[Endpoint]) -> tuple[socket.socket, Endpoint] | None:
    """A non-blocking UDP socket connected to the first endpoint that accepts ``connect``
    (UDP has no handshake: this only fails for local reasons such as no route). ``None`` when
    none did; ``OSError`` when no socket can be created at all (out of descriptors) or no
    local port is left for it (``NO_LOCAL_PORT_ERRNOS``)."""
    for endpoint in endpoints:
        try:
            # Non-blocking from the start: saves the ioctl that setblocking(False) costs.
            sock = socket.socket(family_of(endpoint.host),
                                 socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            if exc.errno in RESOURCE_ERRNOS:
                raise
            continue  # this endpoint's family is missing here (EAFNOSUPPORT): the next one
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FLOW_BUFFER)
            enable_drop_count(sock)
            sock.connect(sockaddr(endpoint.host, endpoint.port))
        except OSError as exc:
            sock.close()
            if exc.errno in NO_LOCAL_PORT_ERRNOS:
                raise  # the same for every endpoint
            continue
        return sock, endpoint
    return None


def resend_after_refusal(flow: Flow, data: memoryview, count: UdpCounters,
                         exc: OSError) -> bool:
    """After sending ``data`` to the backend failed with ``exc``: whether a second try went
    out. Only ECONNREFUSED earns one: an earlier datagram drew ICMP port unreachable, and the
    kernel reports it on this send (and clears it) instead of sending; the caller has
    counted that refusal."""
    if not isinstance(exc, ConnectionRefusedError):
        count.send_failed(exc)
        return False
    try:
        if flow.header is None:
            flow.sock.send(data)
        else:
            flow.sock.sendmsg((flow.header, data))
    except ConnectionRefusedError:
        count.refused_by(flow.endpoint)
        return False
    except OSError as exc2:
        count.send_failed(exc2)
        return False
    return True


def allowed(host: str, allow: Sequence[IPNetwork]) -> bool:
    """Whether a client address is in the allowlist (IPv4-mapped IPv6 counts as IPv4)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in allow)
