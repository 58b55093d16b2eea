"""The TCP engine: listeners, admission, backend connect with retries, relays, drain."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from portproxy.connect import Address, BackendConnect, client_ip, reset_close
from portproxy.deadlines import Deadlines
from portproxy.endpoints import Endpoint
from portproxy.limits import SharedLimit
from portproxy.listen_claims import ListenClaims
from portproxy.loop import wait_at_most
from portproxy.metrics import ProxyMetrics
from portproxy.poller import poller_for
from portproxy.pump import Direction
from portproxy.relay import CLOSE_REASONS, Relay, RelaySetup, RelayTimeouts
from portproxy.sockets import (
    BACKLOG,
    RESOURCE_ERRNOS,
    BindRequest,
    bind_socket,
    bound_address,
    log_address,
    unmapped,
)
from portproxy.spec import Forward, Protocol
from portproxy.target import TargetState

log = logging.getLogger("portproxy.tcp")

#: Connections accepted per readiness callback before yielding to other work.
ACCEPT_BATCH = 64
#: Connections taken from a closing listener's accept queue at most (the backlog's size).
QUEUE_DRAIN_LIMIT = 4096
#: Endpoints tried for one client before giving up (the retry budget).
CONNECT_ATTEMPTS = 3

ProxyHeader = Callable[[Address, Address], bytes]
AccessLog = Callable[[str, Address, str, int, int, float, str], None]


class TcpForwarder:
    """Accepts on one or more listening sockets of a forward and relays to its target."""

    def __init__(
        self,
        forward: Forward,
        target: TargetState,
        metrics: ProxyMetrics,
        direction_type: type[Direction],
        global_limit: SharedLimit | None = None,
        access_log: AccessLog | None = None,
        proxy_header: ProxyHeader | None = None,
        claims: ListenClaims | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.claims = claims
        self.poller = poller_for(self.loop)
        self.deadlines = Deadlines(self.loop)
        self.forward = forward
        self.name = forward.name
        self.target = target
        self.global_limit = global_limit or SharedLimit()
        self.limit = SharedLimit(forward.options.max_conns)
        self.access_log = access_log
        self.proxy_header = proxy_header
        options = forward.options
        self.connect_timeout = options.connect_timeout
        self.allow = options.allow
        self.listeners: dict[str, socket.socket] = {}
        self.waiting: dict[str, socket.socket] = {}
        target.on_change(lambda _endpoints: self._listen_waiting())
        self.relays: set[Relay] = set()
        self.pending: set[BackendConnect] = set()
        self.accepting = True
        self.paused = False
        self._backoff = 0.0
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._waiting: list[BackendConnect] = []
        """Accepted clients whose backend socket found no descriptor, in order."""
        self._idle = asyncio.Event()
        """Set once no longer accepting and the last connection is gone (``drain`` waits)."""
        name = self.name
        self.c_ok = metrics.connections.labels(name, "ok")
        self.c_refused = metrics.connections.labels(name, "refused")
        self.c_timeout = metrics.connections.labels(name, "timeout")
        self.c_denied = metrics.connections.labels(name, "denied")
        self.c_no_endpoints = metrics.connections.labels(name, "no_endpoints")
        self.c_limit = metrics.connections.labels(name, "limit")
        self.c_aborted = metrics.connections.labels(name, "aborted")
        self.g_active = metrics.active.labels(name)
        self.c_closed = metrics.closed
        for reason in CLOSE_REASONS:  # every series from the start, as the others: a
            self.c_closed.labels(name, reason)  # first reset must show in increase()
        self.bytes_up = metrics.bytes.labels(name, "upstream")
        self.bytes_down = metrics.bytes.labels(name, "downstream")
        self.h_connect = metrics.connect_seconds.labels(name)
        self.c_accept_errors = metrics.accept_errors.labels(name)
        timeouts = RelayTimeouts(options.idle_timeout_for(Protocol.TCP), options.fin_timeout)
        self.relay_setup = RelaySetup(self.loop, self.poller, self.deadlines, direction_type,
                                      (self.bytes_up, self.bytes_down), timeouts)

    # -- listeners ------------------------------------------------------------------------
    def add_listener(self, host: str, freebind: bool = False) -> None:
        """Bind ``host`` ('' = all addresses) on the forward's port and accept on it.

        The port is reserved at once (so a conflict fails the start), but listen() waits for
        the target's first resolution: until then the socket takes no connections, so a new
        instance starting beside a running one (SO_REUSEPORT, a rolling update) does not
        receive clients it could only reset.
        """
        if host in self.listeners or host in self.waiting or not self.accepting:
            # Stopped: a removed forward still draining follows its interface until the
            # drain ends; an address added meanwhile must not get a listener nobody closes.
            return
        sock = bind_socket(BindRequest(host, self.forward.listen.port, freebind=freebind,
                                       listen=False), self.name)
        if self.claims is not None:
            self.claims.claim(sock, self, self.name)
        self.waiting[host] = sock
        if self.target.resolved:
            self._listen_waiting()
        else:
            log.info("forward %s: bound tcp %s; listening once the target is resolved",
                     self.name, bound_address(sock), extra={"forward": self.name})

    def _listen_waiting(self) -> None:
        while self.waiting and self.accepting:
            host, sock = self.waiting.popitem()
            try:
                sock.listen(BACKLOG)
            except OSError as exc:
                log.error("forward %s: cannot listen on %s: %s", self.name,
                          bound_address(sock), exc, extra={"forward": self.name})
                sock.close()
                continue
            self.listeners[host] = sock
            if not self.paused:
                self.loop.add_reader(sock.fileno(), self._on_accept, sock)
            log.info("forward %s: listening on tcp %s", self.name, bound_address(sock),
                     extra={"forward": self.name})

    def remove_listener(self, host: str) -> None:
        waiting = self.waiting.pop(host, None)
        if waiting is not None:
            waiting.close()
        sock = self.listeners.pop(host, None)
        if sock is not None:
            self.loop.remove_reader(sock.fileno())
            self._take_queued(sock)
            where = bound_address(sock)  # as "listening on" said it
            sock.close()
            log.info("forward %s: stopped listening on tcp %s", self.name, where,
                     extra={"forward": self.name})

    def _take_queued(self, lsock: socket.socket) -> None:
        """Serve what already waits in the accept queue before closing the listener.

        Closing a listener resets the handshakes completed in its queue. Accepting them
        first leaves only the microseconds between the last accept and close; a node with
        net.ipv4.tcp_migrate_req=1 closes even that gap (the kernel moves such connections
        to another listener of the SO_REUSEPORT group, e.g. the next pod of a rollout).
        Never beyond max-conns or the global limit: those protect the backends, so at the
        limit the rest of the queue is left to the kernel (reset, or migrated).
        """
        for _ in range(QUEUE_DRAIN_LIMIT):
            if self.limit.full or self.global_limit.full:
                log.info("forward %s: at its connection limit while closing a listener; "
                         "clients still in its accept queue are left to the kernel (reset, "
                         "or moved to another listener with net.ipv4.tcp_migrate_req=1)",
                         self.name, extra={"forward": self.name})
                return
            try:
                client, address = lsock.accept()
            except OSError:
                return
            self._admit(client, address)

    @property
    def bound(self) -> bool:
        return bool(self.listeners or self.waiting)

    def _pause(self, limit: bool = True) -> None:
        if not self.paused:
            self.paused = True
            if limit:
                self.c_limit.inc()
            for sock in self.listeners.values():
                self.loop.remove_reader(sock.fileno())

    def _resume(self) -> None:
        if self.paused and self.accepting:
            self.paused = False
            for sock in self.listeners.values():
                self.loop.add_reader(sock.fileno(), self._on_accept, sock)

    # -- accepting ------------------------------------------------------------------------
    def _on_accept(self, lsock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.limit.full or self.global_limit.full:
                per_forward = self.limit.full
                log.warning("forward %s: %s reached (%d open); new clients wait in the "
                            "kernel's accept queue", self.name,
                            "max-conns" if per_forward else "global --max-conns",
                            (self.limit if per_forward else self.global_limit).active,
                            extra={"forward": self.name})
                self._pause()
                waiter = self.limit if per_forward else self.global_limit
                waiter.wait(self, self._resume_if_possible)
                return
            try:
                client, address = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._resource_backoff(exc.errno or errno.EMFILE, "accept")
                    return
                continue  # ECONNABORTED and friends concern one client only
            self._backoff = 0.0
            self._admit(client, address)
            if self._backoff_timer is not None:  # out of descriptors connecting it
                return

    def _resume_if_possible(self) -> None:
        if self.limit.full:
            self.limit.wait(self, self._resume_if_possible)
        elif self.global_limit.full:
            self.global_limit.wait(self, self._resume_if_possible)
        else:
            self._resume()

    def _resource_backoff(self, err: int, during: str) -> None:
        """Out of file descriptors (or memory): stop accepting briefly instead of spinning on
        accept() or resetting every client; the back-off doubles up to 1 s."""
        if self._backoff_timer is not None:
            return
        self.c_accept_errors.inc()
        self._backoff = min(1.0, max(0.05, self._backoff * 2))
        log.error("forward %s: %s failed (%s); not accepting for %.2fs", self.name, during,
                  os.strerror(err), self._backoff, extra={"forward": self.name})
        self._pause(limit=False)
        self._backoff_timer = self.loop.call_later(self._backoff, self._end_backoff)

    def _end_backoff(self) -> None:
        self._backoff_timer = None
        waiting, self._waiting = self._waiting, []
        for attempt in waiting:  # accepted before the shortage: they go first
            if attempt in self.pending:
                attempt.next_unless_client_gone()
        if self._backoff_timer is None:  # none ran out again
            self._resume_if_possible()

    def retry_after_backoff(self, attempt: BackendConnect) -> None:
        """``attempt`` found no descriptor for its backend socket: it tries again once the
        back-off (started by ``on_attempt_failed``) ends."""
        self._waiting.append(attempt)

    def _admit(self, client: socket.socket, address: Address) -> None:
        if self.allow:
            ip = client_ip(address)
            if not any(ip in network for network in self.allow):
                self.c_denied.inc()
                reset_close(client)
                self._log_unrelayed(address, None, 0.0, "denied")
                return
        # Unmapped, as UDP does: on a tcp+udp forward, source-ip sends a client's TCP and
        # UDP to the same endpoint, whether its IPv4 arrived mapped on [::] or not.
        candidates = self.target.candidates(unmapped(address[0]))
        if not candidates:
            self.c_no_endpoints.inc()
            reset_close(client)
            self._log_unrelayed(address, None, 0.0, "no_endpoints")
            return
        client.setblocking(False)  # TCP_NODELAY and keepalive come from the listener
        attempt = BackendConnect(self, client, address, candidates[:CONNECT_ATTEMPTS])
        self.pending.add(attempt)
        self.limit.acquire()
        self.global_limit.acquire()
        # Open from accept to close, connecting included, as max-conns and /forwards count
        # it (HAProxy's scur does the same); _release_slot takes it back on every ending.
        self.g_active.value += 1
        attempt.next()

    # -- connecting -----------------------------------------------------------------------
    def on_attempt_failed(self, attempt: BackendConnect, endpoint: Endpoint, err: int) -> None:
        if err in RESOURCE_ERRNOS:  # ours, not the endpoint's fault
            self._resource_backoff(err, "connect")
            return
        self.target.health.failed(endpoint)  # skipped a while: others take new clients
        if err == errno.EADDRNOTAVAIL:
            # A local limit, not the backend's failure, so the log says what to change: no
            # ephemeral port left toward this endpoint (ports are taken per destination, so
            # the next endpoint may still have some), or no source address of its family.
            log.error("forward %s: no free local port or source address to connect to "
                      "backend %s (ephemeral ports exhausted: widen "
                      "net.ipv4.ip_local_port_range or enable net.ipv4.tcp_tw_reuse; or no "
                      "usable address of its family on this host)", self.name, endpoint,
                      extra={"forward": self.name, "endpoint": str(endpoint)})
            return
        reason = "timed out" if err == errno.ETIMEDOUT else os.strerror(err)
        log.warning("forward %s: backend %s failed for client %s: %s", self.name, endpoint,
                    unmapped(attempt.client_addr[0]), reason,
                    extra={"forward": self.name, "endpoint": str(endpoint)})

    def on_connect_failed(self, attempt: BackendConnect) -> None:
        self.pending.discard(attempt)
        timed_out = attempt.last_error == errno.ETIMEDOUT
        (self.c_timeout if timed_out else self.c_refused).inc()
        reset_close(attempt.client)
        self._log_unrelayed(attempt.client_addr, attempt.endpoint, attempt.accepted,
                            "timeout" if timed_out else "refused")
        self._release_slot()

    def _log_unrelayed(self, client: Address, endpoint: Endpoint | None, accepted: float,
                       result: str) -> None:
        """The access log line of a client reset before any byte was relayed (the last
        endpoint tried, if any; the time since accept, 0 when decided at once)."""
        if self.access_log is not None:
            self.access_log(self.name, log_address(client), str(endpoint or ""), 0, 0,
                            self.loop.time() - accepted if accepted else 0.0, result)

    def on_client_gone(self, attempt: BackendConnect) -> None:
        if attempt not in self.pending:
            return
        self.pending.discard(attempt)
        self.c_aborted.inc()
        attempt.cancel()
        self._log_unrelayed(attempt.client_addr, attempt.endpoint, attempt.accepted,
                            "aborted")
        self._release_slot()

    def on_connected(self, attempt: BackendConnect) -> None:
        self.pending.discard(attempt)
        upstream, endpoint = attempt.sock, attempt.endpoint
        assert upstream is not None and endpoint is not None
        self.h_connect.observe(time.monotonic() - attempt.started)
        self.target.health.succeeded(endpoint)
        client = attempt.client
        if self.proxy_header is not None and not self._send_header(client, upstream,
                                                                   attempt.client_addr):
            self.poller.discard(upstream.fileno())
            reset_close(upstream)
            reset_close(client)
            self.target.closed(endpoint)
            self.c_refused.inc()
            self._log_unrelayed(attempt.client_addr, endpoint, attempt.accepted, "refused")
            self._release_slot()
            return
        self.c_ok.inc()
        relay = Relay(self.relay_setup, client, upstream, endpoint, attempt.client_addr,
                      self._relay_closed, attempt.accepted)
        self.relays.add(relay)
        relay.start()

    def _send_header(self, client: socket.socket, upstream: socket.socket,
                     client_addr: Address) -> bool:
        assert self.proxy_header is not None
        try:
            header = self.proxy_header(client_addr, client.getsockname()[:2])
            # A fresh connection's send buffer is empty, so the header goes out whole.
            return upstream.send(header) == len(header)
        except OSError:
            return False

    def _relay_closed(self, relay: Relay) -> None:
        self.relays.discard(relay)
        endpoint = relay.endpoint
        self.target.closed(endpoint)
        self.c_closed.labels(self.name, relay.result).inc()
        if self.access_log is not None:
            self.access_log(self.name, log_address(relay.client_addr), str(endpoint),
                            relay.bytes_up,
                            relay.bytes_down, self.loop.time() - relay.started, relay.result)
        self._release_slot()

    def _release_slot(self) -> None:
        self.g_active.value -= 1
        self.limit.release()
        self.global_limit.release()
        if not self.accepting and not self.relays and not self.pending:
            self._idle.set()

    # -- stopping -------------------------------------------------------------------------
    def stop_accepting(self) -> None:
        self.accepting = False
        for host in list(self.waiting):
            self.remove_listener(host)
        self.limit.cancel(self)
        self.global_limit.cancel(self)
        if self._backoff_timer is not None and not self._waiting:
            # (With clients waiting it ends the back-off: they connect then.) None, so that
            # a connect running out of descriptors while draining starts a new back-off.
            self._backoff_timer.cancel()
            self._backoff_timer = None
        for host in list(self.listeners):
            self.remove_listener(host)

    @property
    def active(self) -> int:
        return len(self.relays) + len(self.pending)

    async def drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` for open connections to finish, then reset the rest."""
        self.stop_accepting()
        if self.active:
            await wait_at_most(self._idle, timeout)
        self.abort_all()

    def abort_all(self) -> None:
        for attempt in list(self.pending):
            attempt.cancel()
            self.pending.discard(attempt)
            self._log_unrelayed(attempt.client_addr, attempt.endpoint, attempt.accepted,
                                "drain_timeout")
            self._release_slot()
        for relay in list(self.relays):
            relay.result = "drain_timeout"
            relay.abort(None)

