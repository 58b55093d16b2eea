"""The TCP engine over real loopback sockets, against both pumps."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_network

import pytest

from portproxy.endpoints import BalancePolicy, Endpoint
from tests.conftest import wait_for
from tests.net.harness import (
    EchoServer,
    ProxyThread,
    assert_closed_by_proxy,
    free_port,
    recv_all,
    sha,
)


@pytest.fixture
def proxy(echo_server: EchoServer, pump: str) -> Iterator[ProxyThread]:
    p = ProxyThread(echo_server.port, pump)
    try:
        yield p
    finally:
        p.close()


def test_64_mib_each_way_at_once(proxy: ProxyThread) -> None:
    size = 64 * 1024 * 1024
    payload = os.urandom(1024 * 1024) * 64  # 64 MiB; random 1 MiB block repeated
    received = bytearray()
    with proxy.connect() as client:
        reader = threading.Thread(target=lambda: received.extend(recv_all(client)))
        reader.start()
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        reader.join(120)
    assert len(received) == size
    assert sha(received) == sha(payload)
    wait_for(lambda: proxy.metrics.bytes.labels("test", "downstream").value == size,
             what="downstream byte counter")
    assert proxy.metrics.bytes.labels("test", "upstream").value == size


def test_200_concurrent_connections_each_1_mib(proxy: ProxyThread) -> None:
    async def one(index: int) -> bool:
        payload = os.urandom(1024 * 1024)
        reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        echoed = await reader.read()
        writer.close()
        return sha(echoed) == sha(payload)

    async def main() -> list[bool]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(asyncio.wait_for(main(), 120))
    assert results == [True] * 200
    wait_for(lambda: proxy.run(lambda: proxy.engine.active) == 0, what="relays to close")
    assert proxy.counter("ok") == 200
    assert proxy.closed("ok") == 200


def test_client_half_close_then_backend_replies(pump: str) -> None:
    def handler(conn: socket.socket) -> None:
        request = recv_all(conn)  # until the client's FIN arrives through the proxy
        conn.sendall(b"got " + str(len(request)).encode())
        conn.shutdown(socket.SHUT_WR)

    server = EchoServer(handler=handler)
    proxy = ProxyThread(server.port, pump)
    try:
        with proxy.connect() as client:
            client.sendall(b"x" * 100_000)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"got 100000"
    finally:
        proxy.close()
        server.close()


def test_backend_half_close_then_client_sends(pump: str) -> None:
    received: list[bytes] = []

    def handler(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        conn.shutdown(socket.SHUT_WR)  # the backend is done talking, still listening
        received.append(recv_all(conn))

    server = EchoServer(handler=handler)
    proxy = ProxyThread(server.port, pump)
    try:
        with proxy.connect() as client:
            assert recv_all(client) == b"hello"  # EOF reaches the client...
            client.sendall(b"late data after the backend's FIN")  # ...which can still send
            client.shutdown(socket.SHUT_WR)
            wait_for(lambda: received, what="backend to receive the client's bytes")
        assert received == [b"late data after the backend's FIN"]
    finally:
        proxy.close()
        server.close()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound but not listening: connects to it are refused, and no other socket (the
    proxy's own listener, bound to port 0 next) can take it meanwhile."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


def test_backend_refuses(pump: str, refusing_port: int) -> None:
    proxy = ProxyThread(refusing_port, pump)
    try:
        assert_closed_by_proxy(proxy.host, proxy.port)
        assert proxy.counter("refused") == 1
        assert proxy.counter("ok") == 0
    finally:
        proxy.close()


def test_next_endpoint_is_tried_after_a_refusal(echo_server: EchoServer, pump: str,
                                                refusing_port: int) -> None:
    dead = refusing_port
    proxy = ProxyThread(echo_server.port, pump)
    try:
        proxy.set_endpoints([Endpoint("127.0.0.1", dead), Endpoint("127.0.0.1",
                                                                     echo_server.port)])
        for _ in range(4):  # round-robin starts on each endpoint at least once
            with proxy.connect() as client:
                client.sendall(b"ping")
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b"ping"
        assert proxy.counter("ok") == 4
    finally:
        proxy.close()


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A listener whose accept queue is full: the kernel drops further SYNs (no answer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # backlog 0 still queues one or two; fill it for sure
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_connect_timeout(blackhole: int, pump: str) -> None:
    proxy = ProxyThread(blackhole, pump, connect_timeout=0.3)
    try:
        assert_closed_by_proxy(proxy.host, proxy.port)
        assert proxy.counter("timeout") == 1
    finally:
        proxy.close()


def test_a_client_still_connecting_counts_as_active(blackhole: int, pump: str) -> None:
    # As max-conns and /forwards count it: the gauge and /forwards must agree.
    proxy = ProxyThread(blackhole, pump, connect_timeout=2)
    try:
        gauge = proxy.metrics.active.labels("test")
        with proxy.connect():
            wait_for(lambda: proxy.run(lambda: gauge.value) == 1, what="the connecting client")
            assert proxy.run(lambda: proxy.engine.active) == 1
            wait_for(lambda: proxy.counter("timeout") == 1, what="the connect to time out")
            assert proxy.run(lambda: gauge.value) == 0
    finally:
        proxy.close()


def test_least_conn_counts_connects_still_in_flight(blackhole: int, pump: str,
                                                    echo_server: EchoServer) -> None:
    # Counted only once answered, a burst while a connect hangs all went to the endpoint
    # that looked emptiest (6/2/2 in the review's case).
    stalled, echo = Endpoint("127.0.0.1", blackhole), Endpoint("127.0.0.1", echo_server.port)
    proxy = ProxyThread(blackhole, pump, connect_timeout=30,
                        balance=BalancePolicy.LEAST_CONN)
    counts = proxy.engine.target.active
    waiting = None
    try:
        waiting = proxy.connect()  # to the only endpoint yet, the stalled one
        wait_for(lambda: proxy.run(lambda: dict(counts)) == {stalled.key: 1},
                 what="the connect in flight to count")
        proxy.set_endpoints([stalled, echo])
        with proxy.connect() as served:  # the stalled endpoint has one: this goes to echo
            served.sendall(b"served")
            assert served.recv(6, socket.MSG_WAITALL) == b"served"
            assert proxy.run(lambda: dict(counts)) == {stalled.key: 1, echo.key: 1}
        wait_for(lambda: proxy.run(lambda: dict(counts)) == {stalled.key: 1},
                 what="the served connection's count to go")
    finally:
        if waiting is not None:
            waiting.close()
        proxy.close()  # the drain cancels the stalled connect: its count goes too
    assert counts == {}


def test_every_close_reason_has_a_series_from_the_start(echo_server: EchoServer) -> None:
    # As for the other families: a series born at its first increment hides that increment
    # from increase() and rate().
    proxy = ProxyThread(echo_server.port, "copy")
    try:
        text = proxy.run(proxy.metrics.registry.render)
    finally:
        proxy.close()
    closed = [line for line in text.splitlines()
              if line.startswith("portproxy_connections_closed_total{")]
    assert sorted(closed) == sorted(
        f'portproxy_connections_closed_total{{forward="test",reason="{reason}"}} 0'
        for reason in ("ok", "reset", "idle_timeout", "fin_timeout", "drain_timeout"))


def test_idle_timeout_closes_both_sides(echo_server: EchoServer, pump: str) -> None:
    proxy = ProxyThread(echo_server.port, pump, idle_timeout=0.3)
    try:
        with proxy.connect() as client:
            client.sendall(b"a")
            assert client.recv(1) == b"a"
            try:
                assert client.recv(1) == b""  # blocks until the proxy gives up on us
            except ConnectionResetError:
                pass
        wait_for(lambda: proxy.run(lambda: proxy.engine.active) == 0, what="relay closed")
        assert proxy.closed("idle_timeout") == 1
    finally:
        proxy.close()


SLOW_PAYLOAD = 1024 * 1024


def slow_read(client: socket.socket, size: int, pause: float) -> bytes:
    """Read ``size`` bytes, 16 KiB at a time with ``pause`` seconds between reads: a reader
    far slower than the proxy, but never silent for long."""
    chunks: list[bytes] = []
    received = 0
    while received < size and (chunk := client.recv(min(16384, size - received))):
        chunks.append(chunk)
        received += len(chunk)
        time.sleep(pause)  # the slowness under test, not a wait for a condition
    return b"".join(chunks)


@pytest.mark.parametrize("half_closed", [False, True], ids=["open", "half-closed"])
def test_a_slow_reader_is_not_idle(pump: str, half_closed: bool) -> None:
    """Bytes the proxy has handed to the kernel, or only partly written, are still
    traffic: a reader taking 1 MiB over a few idle timeouts is served to the end. With
    the client's side half-closed and the backend's left open, the fin timeout likewise
    counts from the last byte moved, not from the FIN, and then still ends the silence."""
    payload = os.urandom(SLOW_PAYLOAD)
    release = threading.Event()

    def handler(conn: socket.socket) -> None:
        conn.sendall(payload)
        if half_closed:
            release.wait(30)  # keeps its side open: only the fin timeout ends this
        else:
            conn.shutdown(socket.SHUT_WR)
            recv_all(conn)

    server = EchoServer(handler=handler)
    # 64 reads 20 ms apart outlast the timeout about 2.5 times; the timeout leaves room for
    # a reader descheduled for a while on a loaded machine (0.15 s did not).
    timeouts = {"fin_timeout": 0.5} if half_closed else {"idle_timeout": 0.5}
    proxy = ProxyThread(server.port, pump, **timeouts)
    try:
        with proxy.connect() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            if half_closed:
                client.shutdown(socket.SHUT_WR)
            assert slow_read(client, SLOW_PAYLOAD, pause=0.02) == payload
            if not half_closed:
                assert client.recv(1) == b""
        wait_for(lambda: proxy.run(lambda: proxy.engine.active) == 0, what="relay closed")
        assert proxy.closed("fin_timeout" if half_closed else "ok") == 1
    finally:
        release.set()
        proxy.close()
        server.close()


def test_fin_timeout_bounds_a_half_closed_connection(pump: str) -> None:
    def handler(conn: socket.socket) -> None:
        recv_all(conn)  # sees the client's FIN, then never answers nor closes
        threading.Event().wait(30)

    server = EchoServer(handler=handler)
    proxy = ProxyThread(server.port, pump, fin_timeout=0.3)
    try:
        with proxy.connect() as client:
            client.shutdown(socket.SHUT_WR)
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass
        wait_for(lambda: proxy.run(lambda: proxy.engine.active) == 0, what="relay closed")
        assert proxy.closed("fin_timeout") == 1
    finally:
        proxy.close()
        server.close()


def test_max_conns_pauses_accepting_and_resumes(echo_server: EchoServer, pump: str) -> None:
    proxy = ProxyThread(echo_server.port, pump, max_conns=2)
    try:
        first, second = proxy.connect(), proxy.connect()
        for c in (first, second):
            c.sendall(b"x")
            assert c.recv(1) == b"x"
        third = proxy.connect()  # completes in the kernel's accept queue
        third.sendall(b"third")
        wait_for(lambda: proxy.counter("limit") >= 1, what="the limit to pause accepting")
        assert proxy.run(lambda: proxy.engine.active) == 2
        assert echo_server.accepted == 2
        first.close()
        assert third.recv(5, socket.MSG_WAITALL) == b"third"  # served as soon as a slot freed
        assert echo_server.accepted == 3
        second.close()
        third.close()
    finally:
        proxy.close()


@pytest.mark.parametrize("limit", ["max_conns", "global_limit"])
def test_closing_a_listener_at_its_limit_admits_no_queued_client(
        echo_server: EchoServer, pump: str, limit: str) -> None:
    """Closing a listener serves what waits in its accept queue, but never beyond max-conns
    (or the global limit): those clients are left to the kernel, which resets them (or, with
    net.ipv4.tcp_migrate_req=1, hands them to another listener on the port)."""
    proxy = ProxyThread(echo_server.port, pump, **{limit: 1})
    try:
        held = proxy.connect()
        held.sendall(b"held")
        assert held.recv(4, socket.MSG_WAITALL) == b"held"
        queued = [proxy.connect() for _ in range(3)]  # complete in the kernel's queue
        wait_for(lambda: proxy.counter("limit") >= 1, what="the limit to pause accepting")
        proxy.run(proxy.engine.stop_accepting)
        for client in queued:
            client.settimeout(10)
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass  # the listener closed with the client still queued
            client.close()
        assert echo_server.accepted == 1
        assert proxy.run(lambda: len(proxy.engine.pending) + proxy.engine.active) == 1
        held.sendall(b"still")
        assert held.recv(5, socket.MSG_WAITALL) == b"still"
        held.close()
    finally:
        proxy.close()


def test_global_limit_is_shared(echo_server: EchoServer, pump: str) -> None:
    proxy = ProxyThread(echo_server.port, pump, global_limit=1)
    try:
        first = proxy.connect()
        first.sendall(b"1")
        assert first.recv(1) == b"1"
        second = proxy.connect()
        second.sendall(b"2")
        wait_for(lambda: proxy.counter("limit") >= 1, what="the global limit to bite")
        first.close()
        assert second.recv(1) == b"2"
        second.close()
    finally:
        proxy.close()


def test_no_endpoints_closes_quickly(echo_server: EchoServer, pump: str) -> None:
    proxy = ProxyThread(echo_server.port, pump)
    try:
        proxy.set_endpoints([])
        assert_closed_by_proxy(proxy.host, proxy.port)
        assert proxy.counter("no_endpoints") == 1
    finally:
        proxy.close()


def test_allowlist_denies_other_clients(echo_server: EchoServer, pump: str) -> None:
    import ipaddress

    proxy = ProxyThread(echo_server.port, pump, listen_host="",
                        allow=(ipaddress.ip_network("127.0.0.1/32"),))
    try:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as ok:
            ok.sendall(b"hi")
            assert ok.recv(2, socket.MSG_WAITALL) == b"hi"
        assert_closed_by_proxy("127.0.0.1", proxy.port, source="127.0.0.2")
        assert proxy.counter("denied") == 1
    finally:
        proxy.close()


def test_source_ip_hashes_an_ipv4_client_of_a_dual_stack_listener_as_ipv4(pump: str) -> None:
    """On [::], an IPv4 client arrives as ::ffff:a.b.c.d; source-ip must hash a.b.c.d, as the
    UDP engine does, so a tcp+udp forward sends both protocols to the same endpoint."""
    from portproxy.endpoints import BalancePolicy

    servers = [EchoServer() for _ in range(4)]
    proxy = ProxyThread(servers[0].port, pump, listen_host="",
                        balance=BalancePolicy.SOURCE_IP)
    try:
        proxy.set_endpoints([Endpoint("127.0.0.1", s.port) for s in servers])
        by_port = {s.port: s for s in servers}
        for n in range(2, 10):  # eight client addresses: a match by chance is 1 in 65536
            source = f"127.0.0.{n}"
            expected = proxy.run(lambda source=source: proxy.engine.target.candidates(source))
            before = {s.port: s.accepted for s in servers}
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10,
                                          source_address=(source, 0)) as client:
                client.sendall(b"which")
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == b"which"
            served = [port for port, s in by_port.items() if s.accepted > before[port]]
            assert served == [expected[0].port], source
    finally:
        proxy.close()
        for server in servers:
            server.close()


@pytest.mark.parametrize("listen_host,client_host", [("::1", "::1"), ("", "127.0.0.1"),
                                                     ("", "::1")])
def test_ipv6_and_dual_stack_listeners(echo_server: EchoServer, pump: str, listen_host: str,
                                       client_host: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    proxy = ProxyThread(echo_server.port, pump, listen_host=listen_host)
    try:
        with socket.create_connection((client_host, proxy.port), timeout=10) as client:
            client.sendall(b"dual")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"dual"
    finally:
        proxy.close()


def test_ipv6_backend(pump: str) -> None:
    server = EchoServer("::1")
    proxy = ProxyThread(server.port, pump, target_host="::1")
    try:
        with proxy.connect() as client:
            client.sendall(b"six")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"six"
    finally:
        proxy.close()
        server.close()


def test_backend_reset_resets_client(pump: str) -> None:
    import struct

    def handler(conn: socket.socket) -> None:
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()

    server = EchoServer(handler=handler)
    proxy = ProxyThread(server.port, pump)
    try:
        with proxy.connect() as client:
            client.sendall(b"boom")
            with pytest.raises(ConnectionResetError):
                while client.recv(1024):
                    pass
        wait_for(lambda: proxy.run(lambda: proxy.engine.active) == 0, what="relay closed")
    finally:
        proxy.close()
        server.close()


def test_both_sides_have_nodelay_and_keepalive(proxy: ProxyThread) -> None:
    with proxy.connect() as client:
        client.sendall(b"x")
        assert client.recv(1) == b"x"

        def options() -> list[tuple[int, int]]:
            relay = next(iter(proxy.engine.relays))
            return [(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY),
                     s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
                    for s in (relay.client, relay.peer)]
        assert [(bool(a), bool(b)) for a, b in proxy.run(options)] == [(True, True)] * 2


def test_a_stopped_forward_binds_no_new_listener(echo_server: EchoServer, pump: str) -> None:
    """A removed interface forward drains while still following its interface: an address
    that appears then must not get a listener (nothing would ever close it)."""
    proxy = ProxyThread(echo_server.port, pump)
    try:
        proxy.run(proxy.engine.stop_accepting)
        proxy.run(lambda: proxy.engine.add_listener("127.0.0.2"))
        assert proxy.run(lambda: (dict(proxy.engine.listeners), dict(proxy.engine.waiting))) \
            == ({}, {})
    finally:
        proxy.close()


def exchange(proxy: ProxyThread, payload: bytes) -> bytes:
    with proxy.connect() as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def test_access_log_has_a_line_for_every_result_and_counts_from_accept(
        echo_server: EchoServer) -> None:
    """Clients reset before any byte moved (refused, no endpoints, denied) get their line,
    and a connection's duration includes its backend connect, a timed-out try included."""
    # A listener whose accept queue is full drops SYNs: connecting to it times out.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.2", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname(), timeout=10)
    stalled = Endpoint("127.0.0.2", blackhole.getsockname()[1])
    working = Endpoint("127.0.0.1", echo_server.port)
    proxy = ProxyThread(echo_server.port, "copy", connect_timeout=0.3)
    denying = ProxyThread(echo_server.port, "copy", allow=(ip_network("10.0.0.0/8"),))
    try:
        proxy.set_endpoints([stalled, working])
        # Round robin puts the stalled endpoint first for one of the first two clients.
        for i in range(2):
            assert exchange(proxy, b"%d" % i) == b"%d" % i
        wait_for(lambda: len(proxy.access) == 2, what="two lines")
        slow = [r for r in proxy.access if r[6] == "ok" and r[2] == str(working)
                and r[5] >= 0.3]
        assert len(slow) == 1, proxy.access  # waited out the connect timeout, then retried
        dead = free_port()
        proxy.set_endpoints([Endpoint("127.0.0.1", dead)])
        assert_closed_by_proxy(proxy.host, proxy.port)
        proxy.set_endpoints([])
        assert_closed_by_proxy(proxy.host, proxy.port)
        assert_closed_by_proxy(denying.host, denying.port)
        wait_for(lambda: len(proxy.access) == 4 and denying.access, what="the lines")
        assert [(r[2], r[3], r[4], r[6]) for r in proxy.access[2:]] == [
            (f"127.0.0.1:{dead}", 0, 0, "refused"), ("", 0, 0, "no_endpoints")]
        assert [(r[1][0], r[2], r[6]) for r in denying.access] == [("127.0.0.1", "",
                                                                   "denied")]
    finally:
        proxy.close()
        denying.close()
        filler.close()
        blackhole.close()


def reset(sock: socket.socket) -> None:
    """Close with RST (linger 0) instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def was_reset(sock: socket.socket) -> bool:
    """Whether the peer reset ``sock``: a socket that had its peer's FIN reads EOF, not the
    reset, which shows as its pending error (EPIPE once the FIN came; reading clears it)."""
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) in (errno.ECONNRESET,
                                                                    errno.EPIPE)


def reset_is_passed_on(side: str, client: socket.socket, backend_conn: socket.socket,
                       proxy: ProxyThread) -> None:
    """Reset ``side``: the proxy must reset the other side and end the connection as such."""
    if side == "client":
        reset(client)
        wait_for(lambda: was_reset(backend_conn), what="the backend to be reset")
    else:
        reset(backend_conn)
        wait_for(lambda: was_reset(client), what="the client to be reset")
    wait_for(lambda: proxy.closed("reset") == 1, what="the connection to end as reset")


@contextlib.contextmanager
def one_connection(pump: str, backend_side: Callable[[socket.socket], None],
                   release: threading.Event | None = None, backend_rcvbuf: int = 0
                   ) -> Iterator[tuple[ProxyThread, socket.socket]]:
    """A backend running ``backend_side`` on its one connection, a proxy to it and a client
    connected through it: (the proxy, the client). ``release`` is set at the end, before
    anything closes, for a ``backend_side`` that waits on it."""
    backend = EchoServer(handler=backend_side)
    if backend_rcvbuf:  # the accepted socket inherits it
        backend.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, backend_rcvbuf)
    proxy = ProxyThread(backend.port, pump)
    client = proxy.connect()
    try:
        yield proxy, client
    finally:
        if release is not None:
            release.set()
        client.close()
        proxy.close()
        backend.close()


@pytest.mark.parametrize("side", ["client", "backend"])
def test_a_half_closed_side_that_resets_ends_the_connection(pump: str, side: str) -> None:
    """A side sends its FIN, then a reset, while the other side stays silent: the proxy
    must notice at once (not at fin-timeout) and reset the other side too."""
    release = threading.Event()
    backend_conns: list[socket.socket] = []

    def backend_side(conn: socket.socket) -> None:
        if side == "backend":
            conn.sendall(b"bye")
            conn.shutdown(socket.SHUT_WR)
        else:
            recv_all(conn)  # the client's FIN; then silence
        backend_conns.append(conn)
        release.wait(30)

    with one_connection(pump, backend_side, release) as (proxy, client):
        if side == "client":
            client.sendall(b"hello")
            client.shutdown(socket.SHUT_WR)
            wait_for(lambda: backend_conns, what="the FIN to be passed on")
        else:
            assert recv_all(client) == b"bye"  # the backend's FIN came through
            wait_for(lambda: backend_conns, what="the backend's socket")
        reset_is_passed_on(side, client, backend_conns[0], proxy)


def fill_until(sock: socket.socket, done: Callable[[], bool]) -> None:
    """Send on ``sock`` until ``done()``: a full send buffer alone does not say the proxy
    stopped reading (it may only be behind, and catch up into buffers with room)."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    deadline = time.monotonic() + 30
    while not done():
        assert time.monotonic() < deadline, "the proxy never stopped reading"
        try:
            sock.send(chunk)
        except BlockingIOError:
            select.select([], [sock], [], 0.05)


@pytest.mark.parametrize("side", ["client", "backend"])
def test_a_side_that_resets_while_the_other_does_not_read_ends_the_connection(
        pump: str, side: str) -> None:
    """The proxy waits to write to a side that reads nothing while the other side, the one
    it read from, resets: with no traffic the other way, the reset must still be heard at
    once (not at the idle timeout) and passed on."""
    release = threading.Event()
    backend_conns: list[socket.socket] = []

    def backend_side(conn: socket.socket) -> None:
        backend_conns.append(conn)
        release.wait(30)  # reads nothing; the test thread sends on it for side="backend"

    with one_connection(pump, backend_side, release) as (proxy, client):
        wait_for(lambda: backend_conns, what="the backend's socket")

        def proxy_stopped_reading() -> bool:  # the state under test: waiting to write
            return proxy.run(lambda: any((r.up if side == "client" else r.down).writing
                                         for r in proxy.engine.relays))
        fill_until(client if side == "client" else backend_conns[0], proxy_stopped_reading)
        reset_is_passed_on(side, client, backend_conns[0], proxy)


def test_a_clean_end_of_both_ways_while_waiting_to_write_loses_nothing(pump: str) -> None:
    """The backend has half-closed (its FIN passed on), and the client's data and FIN wait
    in the proxy while the backend reads nothing: the client's socket then reports HUP with
    no error, which must not end the connection; every byte is delivered once the backend
    reads."""
    release = threading.Event()
    received: list[bytes] = []
    payload = os.urandom(100_000)

    def backend_side(conn: socket.socket) -> None:
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)
        release.wait(30)
        received.append(recv_all(conn))

    with one_connection(pump, backend_side, release, backend_rcvbuf=4096) as (proxy, client):
        assert recv_all(client) == b"bye"  # the backend's FIN came through
        # Small buffers towards the backend, so the payload (with the FIN behind it) fits
        # in the proxy's receive queue but not on the way to the backend.
        proxy.run(lambda: next(iter(proxy.engine.relays)).peer.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096))
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)

        def waiting_with_the_client_hung_up() -> bool:
            def check() -> bool:
                relay = next(iter(proxy.engine.relays))
                poll = select.poll()
                poll.register(relay.client.fileno(), 0)
                return bool(relay.up.writing and poll.poll(0)[0][1] & select.POLLHUP)
            return proxy.run(check)
        wait_for(waiting_with_the_client_hung_up,
                 what="the proxy to wait on the backend with the client's FIN in")
        release.set()
        wait_for(lambda: received, what="the backend to read to the end")
        assert sha(received[0]) == sha(payload)
        wait_for(lambda: proxy.closed("ok") == 1, what="the connection to end cleanly")


def send_with_urgent_byte(sock: socket.socket, before: bytes, after: bytes) -> None:
    sock.sendall(before)
    assert sock.send(b"!", socket.MSG_OOB) == 1
    sock.sendall(after)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("sender", ["client", "backend"])
def test_urgent_data_is_forwarded_in_line(pump: str, sender: str) -> None:
    """A TCP urgent byte (MSG_OOB) after a bulk transfer: splice stops at the urgent mark
    (it used to spin there, then take the FIN behind it for the end and drop the rest),
    and a plain read steps over the urgent byte. Every byte must arrive, in order."""
    before, after = os.urandom(4 << 20), os.urandom(1 << 20)
    expected = before + b"!" + after
    received: list[bytes] = []

    def backend_side(conn: socket.socket) -> None:
        if sender == "backend":
            send_with_urgent_byte(conn, before, after)
        received.append(recv_all(conn))

    with one_connection(pump, backend_side) as (_proxy, client):
        if sender == "client":
            send_with_urgent_byte(client, before, after)
            assert recv_all(client) == b""
            wait_for(lambda: received, what="the backend to read to the end")
            got = received[0]
        else:
            client.shutdown(socket.SHUT_WR)
            got = recv_all(client)
        assert (len(got), sha(got)) == (len(expected), sha(expected))


def test_a_connect_cut_by_the_drain_timeout_gets_its_access_line(echo_server: EchoServer
                                                                  ) -> None:
    blackhole = socket.socket()  # accept queue full: connecting to it stalls
    blackhole.bind(("127.0.0.2", 0))
    blackhole.listen(0)
    stalled = blackhole.getsockname()[1]
    filler = socket.create_connection(("127.0.0.2", stalled), timeout=10)
    proxy = ProxyThread(stalled, "copy", target_host="127.0.0.2", connect_timeout=60)
    client = proxy.connect()
    try:
        wait_for(lambda: proxy.run(lambda: len(proxy.engine.pending)) == 1,
                 what="the stalled connect")
    finally:
        proxy.close()  # drains with a timeout of 0
        client.close()
        filler.close()
        blackhole.close()
    assert [(r[2], r[3], r[4], r[6]) for r in proxy.access] == [
        (f"127.0.0.2:{stalled}", 0, 0, "drain_timeout")]


def test_a_client_that_resets_while_its_backend_connects_ends_the_attempt(
        echo_server: EchoServer) -> None:
    """The first endpoint stalls, the next two refuse: once the first times out, an attempt
    whose client reset meanwhile ends there (aborted), instead of trying the others for a
    client that is gone (and ending as refused, or after more connect timeouts)."""
    blackhole = socket.socket()  # accept queue full: connecting to it stalls
    blackhole.bind(("127.0.0.2", 0))
    blackhole.listen(0)
    stalled = blackhole.getsockname()[1]
    filler = socket.create_connection(("127.0.0.2", stalled), timeout=10)
    # The reset must come before the connect timeout (else the attempt moves on to the
    # refusing endpoints first): 3 s outlasts a stalled test thread.
    proxy = ProxyThread(stalled, "copy", target_host="127.0.0.2", connect_timeout=3.0,
                        max_conns=1)
    try:
        proxy.set_endpoints([Endpoint(f"127.0.0.{i}", stalled) for i in (2, 3, 4)])
        client = proxy.connect()
        wait_for(lambda: proxy.run(lambda: len(proxy.engine.pending)) == 1,
                 what="the stalled connect")
        reset(client)
        wait_for(lambda: proxy.run(lambda: len(proxy.engine.pending)) == 0,
                 what="the attempt to end")
        assert (proxy.counter("aborted"), proxy.counter("refused")) == (1, 0)
        assert [r[6] for r in proxy.access] == ["aborted"]
        # Its max-conns slot is free again: the next client is connected.
        proxy.set_endpoints([Endpoint("127.0.0.1", echo_server.port)])
        assert exchange(proxy, b"next") == b"next"
    finally:
        proxy.close()
        filler.close()
        blackhole.close()
