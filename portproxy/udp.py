"""The UDP engine: one flow per client address, relayed over its own connected socket.

Shape (the same surface as ``TcpForwarder``, so the daemon drives both alike):

- Listening sockets are raw non-blocking sockets watched with ``loop.add_reader``; datagrams
  are read with ``recvmsg_into`` into ONE reusable 64 KiB buffer per forward, because the
  ancillary data (PKTINFO, see ``udp_pktinfo``) is out of reach of asyncio's datagram
  transports. Nothing is allocated per datagram beyond a memoryview slice and the tuple
  ``recvmsg_into`` returns: the payload is sent straight from the buffer (UDP sends are
  all-or-nothing into the kernel, so the buffer is free again when ``send`` returns).
  Profiles put about half of the forwarder's time in the four syscalls of a round trip;
  the Python around them is kept to local names and in-place counter updates.
- Each flow owns a socket ``connect``-ed to its endpoint (so the kernel filters replies to
  that endpoint and reports ICMP errors on it), watched through the forward's ``FlowPoller``;
  replies go out of the listening socket the client used, from the address it sent to.
- Flow lifetimes live in ``FlowTable`` (idle expiry, LRU eviction at ``max-flows``) driven by
  ONE timer per forward; traffic never touches the timer.
- ``proxy-protocol=v2``: a ``DGRAM`` header, built once per flow, is sent in front of every
  datagram to the backend with scatter-gather ``sendmsg`` (no copy); replies go without it.
- When the endpoint of a flow disappears from the target, the flow moves to a new endpoint on
  its next datagram from the client (a generation number makes the check O(1)); replies
  already queued on its old socket are relayed before that socket closes.
- Drain: flows are served until each has been quiet for ``DRAIN_QUIET`` s, bounded by the
  drain timeout; then the listening sockets close. They stay open until then because
  replies must leave from them, so beside a new instance sharing the port through
  SO_REUSEPORT the kernel keeps hashing part of the new clients (and their retries, from
  the same port) to them. When the process is stopping those are served like any other
  while a flow it had at the stop lasts (dropped, they would have no way in until the
  socket closes); otherwise they go to the forward's successor (a reload replaced it) or
  are dropped (``draining``: a reload removed it, as its closed TCP listener refuses them).
- Payload bytes also count in ``portproxy_bytes_total`` (PROXY headers excluded).

Drops are counted in ``portproxy_udp_dropped_total{reason}``; the reasons are listed on
``portproxy.udp_flow.UdpCounters``.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.flowtable import FlowLimits, FlowTable
from portproxy.listen_claims import ListenClaims
from portproxy.loop import wait_at_most
from portproxy.metrics import ProxyMetrics
from portproxy.proxyproto import encode_v2
from portproxy.sockets import (
    BindRequest,
    bind_socket,
    bound_address,
    is_dual_stack,
    log_address,
    unmapped,
)
from portproxy.spec import Forward, Protocol, ProxyProtocol
from portproxy.target import TargetState
from portproxy.tcp import AccessLog
from portproxy.udp_flow import (
    DRAIN_QUIET,
    NO_LOCAL_PORT_ERRNOS,
    Client,
    Flow,
    FlowExpiry,
    FlowPoller,
    UdpCounters,
    allowed,
    connect_first,
    resend_after_refusal,
    table_clock,
)
from portproxy.udp_pktinfo import (
    ANCILLARY_SIZE,
    DROPS_ANCILLARY_SIZE,
    Ancillary,
    LocalAddresses,
    enable,
    enable_drop_count,
    needs_pktinfo,
    pktinfo_of,
)

log = logging.getLogger("portproxy.udp")

_SOL_SOCKET: int = socket.SOL_SOCKET

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
#: Batches read from a replaced forward's listening socket as it closes: a full listener
#: buffer of small datagrams is a few thousand.
QUEUED_BATCHES = 128
#: Replies read from a flow's socket before the flow leaves it: more than its buffer
#: (FLOW_BUFFER, doubled by the kernel) holds of the smallest datagrams.
QUEUED_REPLIES = 4096


class UdpForwarder:
    """Receives on one or more listening sockets of a forward and relays flows to its target."""

    def __init__(self, forward: Forward, target: TargetState, metrics: ProxyMetrics,
                 access_log: AccessLog | None = None,
                 claims: ListenClaims | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.claims = claims
        self.forward = forward
        self.name = forward.name
        self.target = target
        self.health = target.udp_health
        self.access_log = access_log
        options = forward.options
        self.allow = options.allow
        self.proxy_v2 = options.proxy_protocol == ProxyProtocol.V2
        self.idle_timeout = options.idle_timeout_for(Protocol.UDP)
        self.responses = options.responses
        self.table: FlowTable[Client, Flow] = FlowTable(
            FlowLimits(self.idle_timeout, options.max_flows), table_clock(self.loop))
        self.listeners: dict[str, socket.socket] = {}
        self.ports: dict[socket.socket, int] = {}
        """The port each listening socket is bound to (the PROXY header's destination port)."""
        self.kernel_drops: dict[socket.socket, int] = {}
        """Per listening socket, the kernel's drop count already counted as overload."""
        self.locals = LocalAddresses()
        self.buffer = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buffer)
        self.spare = bytearray(RECV_BUFFER)
        self.spare_view = memoryview(self.spare)
        """Swapped in for ``buffer`` while replies are read in the middle of relaying a
        client's datagram (``_relay_queued``)."""
        self.accepting = True
        self._stop_flows: set[Flow] = set()
        """The process is stopping: the flows it had then, still open. Until they end, new
        clients reaching the listening sockets (open for those flows' replies) get flows
        too, rather than be dropped with no other way in (see the module's notes)."""
        self.expiry = FlowExpiry(self.loop, self.table, self.idle_timeout, self._close)
        self.poller = FlowPoller(self.loop, self._on_reply)
        self._idle = asyncio.Event()
        """Set once no longer accepting and the last flow is gone (what ``drain`` awaits)."""
        self.generation = 0
        self.endpoint_keys = frozenset(e.key for e in target.endpoints.endpoints)
        target.on_change(self._endpoints_changed)
        self.count = UdpCounters(metrics, self.name)
        self.successors: list[UdpForwarder] = []
        """Set when a reload replaced this forward: the new ones bound to its addresses,
        which take the new clients this one still receives while it drains."""
        self.predecessors: list[UdpForwarder] = []
        """The reverse, until this one's target resolves: the forwards it replaces, which
        still serve (the hand-over) the new clients this one receives meanwhile."""
        self._peers: dict[socket.socket, socket.socket] = {}
        """A predecessor's listening socket → this forward's one on the same address."""

    # -- listeners ------------------------------------------------------------------------
    def add_listener(self, host: str, freebind: bool = False) -> None:
        """Bind ``host`` ('' = all addresses) on the forward's port and start receiving."""
        if host in self.listeners or not self.accepting:
            return  # stopped: see TcpForwarder.add_listener
        request = BindRequest(host, self.forward.listen.port, socket.SOCK_DGRAM, freebind)
        sock = bind_socket(request, self.name)
        if self.claims is not None:
            self.claims.claim(sock, self, self.name)
        wildcard = needs_pktinfo(sock)
        try:
            if wildcard:
                enable(sock)
            else:
                enable_drop_count(sock)
            for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                sock.setsockopt(socket.SOL_SOCKET, option, LISTENER_BUFFER)
        except OSError:
            sock.close()
            raise
        self.listeners[host] = sock
        self.ports[sock] = sock.getsockname()[1]
        self.kernel_drops[sock] = 0
        self.locals.add(sock, wildcard)
        self.loop.add_reader(sock.fileno(), self._on_datagram, sock, wildcard)
        log.info("forward %s: listening on udp %s", self.name, bound_address(sock),
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
        del self.kernel_drops[sock]
        self.locals.remove(sock)
        where = bound_address(sock)  # as "listening on" said it
        sock.close()
        log.info("forward %s: stopped listening on udp %s", self.name, where,
                 extra={"forward": self.name})

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
    def _on_datagram(self, lsock: socket.socket, wildcard: bool) -> None:
        # The per-datagram path: names are bound to locals and counters bumped in place
        # (``.value +=``), because attribute lookups and calls are most of its Python cost.
        buffers, view = (self.buffer,), self.view
        get = self.table.get
        count = self.count
        datagrams, payload = count.datagrams_up, count.bytes_up
        responses = self.responses
        for _ in range(BATCH):
            try:
                size, ancdata, _flags, client = lsock.recvmsg_into(buffers, ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                count.error.value += 1
                continue
            # The drop count rides along only after drops, and first: the kernel puts socket-
            # level data before the IP level's pktinfo (one or, for IPv4 on a dual-stack
            # listener, two of them), so one comparison per datagram finds it.
            if ancdata and ancdata[0][0] == _SOL_SOCKET:
                self.kernel_drops[lsock] = count.kernel_drops(self.kernel_drops[lsock], ancdata)
            flow = get(client)
            if flow is None or flow.generation != self.generation or flow.listener is not \
                    lsock or (wildcard and pktinfo_of(ancdata) != flow.local.raw):
                flow = self._flow_for(lsock, client, ancdata, wildcard, flow)
                if flow is None:
                    continue
                if flow.owner is not self:  # handed over: its forward's options and counts
                    flow.owner.relay_up(flow, view[:size])
                    continue
            try:
                if flow.header is None:
                    flow.sock.send(view[:size])
                else:
                    flow.sock.sendmsg((flow.header, view[:size]))
            except OSError as exc:
                if not self._resent(flow, view[:size], exc):
                    continue
            flow.bytes_up += size
            flow.awaiting += responses
            datagrams.value += 1
            payload.value += size

    def _resent(self, flow: Flow, data: memoryview, exc: OSError) -> bool:
        """After sending ``data`` on ``flow`` failed with ``exc``: whether a second try went
        out (``resend_after_refusal``; the drop is counted when not). A refusal reported on
        the send is an earlier datagram's ICMP, so the flow may first move to an endpoint
        that answers (``_move_off_refusing``). A flow none of whose datagrams went out
        ends: kept, it would hold a socket and a max-flows place for its idle timeout, and
        with responses=N wait for replies to nothing."""
        if isinstance(exc, ConnectionRefusedError):
            # Replies queued behind the error first, as on the read path; meanwhile this
            # datagram counts as awaited, so that they cannot end the flow "answered".
            sock = flow.sock
            flow.awaiting += self.responses
            self._relay_queued(flow)
            flow.awaiting -= self.responses
            if self.table.peek(flow.client) is not flow:
                # Ended among them (a second refusal, or more replies than awaited): this
                # datagram goes with it, counted as refused like the one before it.
                self.count.refused.value += 1
                return False
            if flow.sock is sock:  # (else that second refusal moved it already)
                self._note_refusal(flow)
                if not self._move_off_refusing(flow) and self.responses:
                    # That datagram's replies will not come; this one's are added once sent.
                    flow.awaiting = max(0, flow.awaiting - self.responses)
        if resend_after_refusal(flow, data, self.count, exc):
            return True
        if not flow.bytes_up and self.table.peek(flow.client) is flow:
            self.table.remove(flow.client)
            self._close(flow, "error")
        return False

    def relay_up(self, flow: Flow, data: memoryview) -> None:
        """Send a datagram of ``flow`` (a predecessor received it) and count it, as
        ``_on_datagram`` does inline for its own."""
        count = self.count
        try:
            if flow.header is None:
                flow.sock.send(data)
            else:
                flow.sock.sendmsg((flow.header, data))
        except OSError as exc:
            if not self._resent(flow, data, exc):
                return
        flow.bytes_up += len(data)
        flow.awaiting += self.responses
        count.datagrams_up.value += 1
        count.bytes_up.value += len(data)

    # -- flows ------------------------------------------------------------------------------
    def _flow_for(self, lsock: socket.socket, client: Client, ancdata: list[Ancillary],
                  wildcard: bool, flow: Flow | None) -> Flow | None:
        """The flow to relay ``client``'s datagram on when ``flow`` (its entry in the
        table) is none or not fit as it is; None when the datagram is dropped (counted)."""
        if flow is None:
            return self._new_flow(lsock, client, ancdata, wildcard)
        if flow.listener is not lsock or (wildcard and pktinfo_of(ancdata) != flow.local.raw):
            self._relocate(flow, lsock, ancdata, wildcard)
        if flow.generation != self.generation:
            return self._endpoint_ok(flow, lsock, ancdata, wildcard)
        return flow

    def _new_flow(self, lsock: socket.socket, client: Client, ancdata: list[Ancillary],
                  wildcard: bool) -> Flow | None:
        if not self.accepting:
            handled, flow = self._hand_over(lsock, client, ancdata)
            if handled:
                return flow
            if not self._stop_flows:
                self.count.draining.inc()
                return None
        if self.predecessors and not self.target.resolved:
            # Bound beside the forward it replaces, whose target still works: the kernel
            # gives this socket part of the new clients, which that one serves meanwhile.
            for predecessor in self.predecessors:
                if predecessor.accepting:
                    handled, flow = predecessor._take_over(lsock, client, ancdata)
                    if handled:
                        return flow
                else:  # the hand-over gave up on this one; what it serves, it finishes
                    served = predecessor.table.get(client)
                    if served is not None:
                        return served
        if self.allow and not allowed(client[0], self.allow):
            self.count.denied.inc()
            return None
        connected = self._connect(client)
        if connected is None:
            return None
        sock, endpoint = connected
        local = self.locals.of(lsock, ancdata, wildcard)
        flow = Flow(self, client, lsock, local, sock, endpoint, self.loop.time())
        flow.generation = self.generation
        flow.header = self._header(flow)
        self._admit(flow)
        return flow

    def _hand_over(self, lsock: socket.socket, client: Client, ancdata: list[Ancillary]
                   ) -> tuple[bool, Flow | None]:
        """A new client reaching this replaced, draining forward: SO_REUSEPORT spreads
        clients over every socket bound to the address, this one's too until it closes, so
        the successor on the same address takes it (its flow, its socket for the replies).
        (handled, the flow or None if the successor dropped it); (False, None) when no
        successor has that address."""
        for successor in self.successors:
            handled, flow = successor._take_over(lsock, client, ancdata)
            if handled:
                return handled, flow
        return False, None

    def _take_over(self, theirs: socket.socket, client: Client, ancdata: list[Ancillary]
                   ) -> tuple[bool, Flow | None]:
        if not self.accepting:  # replaced in turn: its own successors
            return self._hand_over(theirs, client, ancdata)
        mine = self._peers.get(theirs)
        if mine is None or mine not in self.ports:
            # The same address, and a dual-stack socket's IPv4 clients only to another
            # dual-stack one: an IPv6-only successor on [::] could not answer them.
            address = (theirs.getsockname(), is_dual_stack(theirs))
            mine = next((s for s in self.ports
                         if (s.getsockname(), is_dual_stack(s)) == address), None)
            if mine is None:
                return False, None
            self._peers[theirs] = mine
        return True, self._flow_for(mine, client, ancdata, mine not in self.locals.bound,
                                    self.table.get(client))

    def _connect(self, client: Client, candidates: list[Endpoint] | None = None
                 ) -> tuple[socket.socket, Endpoint] | None:
        """A socket connected to a candidate endpoint for ``client`` (counted when none);
        ``candidates``: the target's order for it, when the caller has it already."""
        if candidates is None:
            candidates = self.target.candidates(unmapped(client[0]), self.health)
        if not candidates:
            self.count.no_endpoints.inc()
            return None
        try:
            connected = connect_first(candidates[:CONNECT_ATTEMPTS])
        except OSError as exc:  # out of descriptors, memory or local ports: a flood; shed it
            self.count.overload.inc()
            hint = ("widen net.ipv4.ip_local_port_range or lower max-flows"
                    if exc.errno in NO_LOCAL_PORT_ERRNOS else "raise the file descriptor limit"
                    " or lower max-flows")
            log.error("forward %s: no socket for a new flow (%s): %s", self.name,
                      exc.strerror or exc, hint, extra={"forward": self.name})
            return None
        if connected is None:
            self.count.error.inc()
        return connected

    def _header(self, flow: Flow) -> bytes | None:
        if not self.proxy_v2:
            return None
        return encode_v2(flow.client, (flow.local.host, self.ports[flow.listener]), "dgram")

    def _admit(self, flow: Flow) -> None:
        evictions = self.table.evictions
        removed = self.table.add(flow.client, flow)
        if removed is not None:
            evicted = self.table.evictions != evictions
            if evicted:
                self.count.evicted_one(self.loop.time(), self.table.limits.max_flows)
            self._close(removed[1], "evicted" if evicted else "expired")
        self.poller.add(flow)
        self.target.opened(flow.endpoint)
        self.count.flows.value += 1
        self.expiry.arm()

    def _relocate(self, flow: Flow, lsock: socket.socket, ancdata: list[Ancillary],
                  wildcard: bool) -> None:
        """The client now sends to another local address: answer from that one."""
        flow.listener = lsock
        flow.local = self.locals.of(lsock, ancdata, wildcard)
        flow.header = self._header(flow)

    def _endpoints_changed(self, endpoints: EndpointSet) -> None:
        self.predecessors = []  # resolved: its own target serves its clients now
        self.generation += 1
        self.endpoint_keys = frozenset(e.key for e in endpoints.endpoints)

    def _endpoint_ok(self, flow: Flow, lsock: socket.socket, ancdata: list[Ancillary],
                     wildcard: bool) -> Flow | None:
        """After an endpoint change: the flow to relay the client's datagram on (``flow``,
        kept on its endpoint or moved to a new one, or a new flow when ``flow`` has just
        ended), or None when the datagram is dropped (and counted)."""
        if flow.endpoint.key in self.endpoint_keys:
            flow.generation = self.generation
            return flow
        # The flow leaves its socket (moving or closing): replies already queued on it would
        # vanish with it, uncounted. Relay them now, as the poller would have, had it run
        # before this datagram was read.
        self._relay_queued(flow)
        if self.table.peek(flow.client) is not flow:
            # That was the last reply awaited (responses=N), or a refusal ended it: as with
            # that order of events, the datagram starts a new flow.
            return self._new_flow(lsock, flow.client, ancdata, wildcard)
        if flow.generation == self.generation:
            return flow  # a refusal among those replies moved it to a current endpoint
        connected = self._connect(flow.client)
        if connected is None:
            self.table.remove(flow.client)
            self._close(flow, "no_endpoints")
            return None
        old = flow.endpoint
        self._move(flow, connected)
        # Debug: when an endpoint goes, every one of its flows moves (thousands, for DNS).
        log.debug("forward %s: flow of %s moved from %s to %s (endpoint gone)", self.name,
                 log_address(flow.client), old, flow.endpoint, extra={"forward": self.name})
        return flow

    def _note_refusal(self, flow: Flow) -> None:
        """ICMP port unreachable came back on ``flow``'s socket: count it, and skip the
        endpoint a while for new flows, as a refused TCP connect does."""
        self.count.refused_by(flow.endpoint)
        self.health.failed(flow.endpoint)

    def _move_off_refusing(self, flow: Flow) -> bool:
        """Move ``flow`` to the first candidate endpoint if that one is not benched too;
        whether it moved. With one endpoint, or all refusing, the flow stays (a backend
        restarting on the same port then gets its next datagram from the same port)."""
        candidates = self.target.candidates(unmapped(flow.client[0]), self.health)
        if not candidates or self.health.is_benched(candidates[0]):
            return False  # none known to answer (this one is benched now)
        try:
            connected = connect_first(candidates[:CONNECT_ATTEMPTS])
        except OSError:
            return False  # out of descriptors or ports: the old socket still works
        if connected is None:
            return False
        self._move(flow, connected)
        return True

    def _move(self, flow: Flow, connected: tuple[socket.socket, Endpoint]) -> None:
        """Point ``flow`` at another endpoint through a new socket. Replies still due from
        the old one can no longer arrive, so none is awaited any more."""
        self.poller.remove(flow)
        flow.sock.close()
        self.target.closed(flow.endpoint)
        flow.sock, flow.endpoint = connected
        flow.generation, flow.drops, flow.awaiting = self.generation, 0, 0
        self.target.opened(flow.endpoint)
        self.poller.add(flow)

    def _take_queued(self, lsock: socket.socket) -> None:
        """Handle what waits on a listening socket about to close (bounded; off the data
        path: once per socket of a replaced forward)."""
        wildcard = needs_pktinfo(lsock)
        for _ in range(QUEUED_BATCHES):
            try:
                lsock.recv(1, socket.MSG_PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                pass  # a pending error (ICMP) is taken by the read below
            self._on_datagram(lsock, wildcard)

    def _relay_queued(self, flow: Flow) -> None:
        """Relay what is queued on ``flow``'s socket, through ``_on_reply`` (same counters and
        ``responses`` accounting): off the per-datagram path, run only when a flow leaves
        its socket."""
        # ``_on_reply`` reads into ``buffer``, which still holds the client's datagram that
        # ``_on_datagram`` sends after this returns: lend it the spare buffer meanwhile.
        self.buffer, self.spare = self.spare, self.buffer
        self.view, self.spare_view = self.spare_view, self.view
        try:
            self._on_reply(flow, QUEUED_REPLIES)
        finally:
            self.buffer, self.spare = self.spare, self.buffer
            self.view, self.spare_view = self.spare_view, self.view

    def _close(self, flow: Flow, result: str) -> None:
        """Release a flow already removed from the table."""
        if self._stop_flows:
            self._stop_flows.discard(flow)
            if not self._stop_flows and self.table:
                # New clients are turned away from now on. Those let in meanwhile get as
                # long as a quiet flow would, however busy, or one of them could hold the
                # sockets open to the drain timeout.
                self.loop.call_later(DRAIN_QUIET, self._end_admitted_while_stopping)
        self.poller.remove(flow)
        flow.sock.close()
        self.target.closed(flow.endpoint)
        self.count.flows.value -= 1
        if self.access_log is not None:
            self.access_log(self.name, log_address(flow.client), str(flow.endpoint),
                            flow.bytes_up, flow.bytes_down, self.loop.time() - flow.started,
                            result)
        if not self.accepting and not self.table:
            self._idle.set()

    # -- backend → client -----------------------------------------------------------------
    def _on_reply(self, flow: Flow, batch: int) -> None:
        """Relay up to ``batch`` replies waiting on ``flow``'s socket to its client."""
        sock, view, buffers = flow.sock, self.view, (self.buffer,)
        count, responses = self.count, self.responses
        sent = 0
        refused = False
        for _ in range(batch):
            try:
                size, ancdata, _flags, _ = sock.recvmsg_into(buffers, DROPS_ANCILLARY_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionRefusedError:
                # ICMP port unreachable. The kernel reports it before replies already
                # queued, and clears it: read those first, then act on it below.
                refused = True
                continue
            except OSError:
                count.error.value += 1
                break
            if ancdata:  # replies the kernel dropped on this flow's full buffer
                flow.drops = count.kernel_drops(flow.drops, ancdata)
            flow.awaiting -= 1  # only read with responses=N: then each reply counts down
            try:
                if flow.local.reply:
                    flow.listener.sendmsg((view[:size],), flow.local.reply, 0, flow.client)
                else:  # a listener bound to one address: replies leave from it anyway
                    flow.listener.sendto(view[:size], flow.client)
            except OSError as exc:
                self.count.send_failed(exc)
            else:
                sent += 1
                flow.bytes_down += size
                count.bytes_down.value += size
            if responses and flow.awaiting <= 0:
                break
        if sent:
            count.datagrams_down.value += sent
            if self.health.failing:  # it answers: no longer skipped (a lookup only then)
                self.health.succeeded(flow.endpoint)
        if responses and flow.awaiting <= 0:
            # Every reply the client's datagrams asked for has come: the flow is done
            # (replies after this reach a closed socket and are dropped by the kernel).
            self.table.remove(flow.client)
            self._close(flow, "answered")
            return
        if sent:
            self.table.touch(flow.client)
        if refused:
            # A first pass reads one datagram per flow (see FlowPoller): the replies queued
            # behind the error are read now, before the flow may leave this socket.
            self._on_reply(flow, QUEUED_REPLIES)
            if self.table.peek(flow.client) is not flow or flow.sock is not sock:
                return  # all awaited replies came ("answered"), or a second refusal acted
            self._note_refusal(flow)
            if responses:
                # The refused datagram will have no reply: it counts as answered by nothing,
                # and a flow then awaiting none ends, as an answered one does. One still
                # awaiting replies stays where they will come from (an ICMP error does not
                # end a flow); its client's retries end it the same way if they are refused.
                flow.awaiting -= responses
                if flow.awaiting <= 0:
                    self.table.remove(flow.client)
                    self._close(flow, "refused")
            else:  # the client's next datagram goes to an endpoint that answers
                self._move_off_refusing(flow)

    # -- stopping -------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        """Start draining. While flows exist the listening sockets stay open, because their
        replies leave through them (``drain`` or ``abort_all`` closes them later); with no
        flow they close at once, which also releases them when the daemon gives up on a
        forward it has just built. New clients still reaching them are dropped, or handed
        to a successor; ``serve_while_stopping`` changes that."""
        self.accepting = False
        if not self.table:
            self._close_sockets()

    def serve_while_stopping(self) -> None:
        """The process is stopping (SIGTERM): the listening sockets stay open while the
        flows there are now end, and new clients still reaching them meanwhile (beside a new
        instance, the kernel keeps hashing part of them, with their retries from the same
        port, to these sockets) are served like any other. Bounded by those flows, not by
        the new ones: a stopping instance that kept getting new clients would otherwise
        serve them until the drain timeout and then cut them off."""
        self._stop_flows = {flow for _, flow in self.table.items() if flow.owner is self}

    def _end_admitted_while_stopping(self) -> None:
        for client, flow in self.table.items():
            if self.table.peek(client) is not flow:
                continue  # ended meanwhile (a refusal among the replies relayed below)
            self._relay_queued(flow)  # the replies already here still go out
            if self.table.peek(client) is flow:
                self.table.remove(client)
                self._close(flow, "drained")

    def has_successor_in(self, engines: set[UdpForwarder]) -> bool:
        """Whether a successor of this replaced forward, or of its successors in turn (later
        reloads), is one of ``engines``."""
        seen: set[int] = set()
        todo = list(self.successors)
        while todo:
            successor = todo.pop()
            if successor in engines:
                return True
            if id(successor) not in seen:
                seen.add(id(successor))
                todo.extend(successor.successors)
        return False

    async def drain(self, timeout: float) -> None:
        """Serve existing flows until each has been quiet for ``DRAIN_QUIET`` seconds (or
        its idle timeout, if shorter), for at most ``timeout`` seconds; then close all."""
        self.stop_accepting()
        self.expiry.start_draining()
        if self.table:
            await wait_at_most(self._idle, timeout)
        self.abort_all()

    def abort_all(self) -> None:
        """Close every flow and every listening socket now."""
        self.accepting = False
        self.expiry.cancel()
        for _, flow in self.table.clear():
            self._close(flow, "drain_timeout")
        self._close_sockets()

    def _close_sockets(self) -> None:
        self.count.log_evictions(self.table.limits.max_flows)
        if self.successors:
            # Until a socket closes, SO_REUSEPORT keeps giving it part of the new clients:
            # what is queued on it goes to the successors rather than into the bin.
            for sock in self.listeners.values():
                self._take_queued(sock)
        for host in list(self.listeners):
            self.remove_listener(host)
        self.poller.close()
        for successor in self.successors:  # done: nothing left to serve for them
            if self in successor.predecessors:
                successor.predecessors.remove(self)

