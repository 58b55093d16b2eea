"""The UDP engine over real loopback sockets: integrity, flows, expiry, ICMP, reply source."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
import termios
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from portproxy.endpoints import Endpoint
from portproxy.errors import SetupError
from portproxy.proxyproto import parse_v2
from portproxy.spec import ProxyProtocol
from tests.conftest import wait_for
from tests.net.udp_harness import (
    UdpBackend,
    UdpProxy,
    client,
    ipv6_loopback_available,
    loop_factory,
)

MakeProxy = Callable[..., UdpProxy]
MakeBackend = Callable[..., UdpBackend]


@pytest.fixture
def make_backend() -> Iterator[MakeBackend]:
    backends: list[UdpBackend] = []

    def make(*args: Any, **kwargs: Any) -> UdpBackend:
        backend = UdpBackend(*args, **kwargs)
        backends.append(backend)
        return backend
    try:
        yield make
    finally:
        for backend in backends:
            backend.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def make_proxy(request: pytest.FixtureRequest) -> Iterator[MakeProxy]:
    """Every engine test runs on asyncio's loop and on uvloop (what the CLI prefers)."""
    factory = loop_factory(request.param)
    if factory is None:
        pytest.skip("uvloop is not installed (the 'fast' extra)")
    proxies: list[UdpProxy] = []
    build = partial(UdpProxy, loop_factory=factory)

    def make(*args: Any, **kwargs: Any) -> UdpProxy:
        proxy = build(*args, **kwargs)
        proxies.append(proxy)
        return proxy
    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


@pytest.fixture
def backend(make_backend: MakeBackend) -> UdpBackend:
    return make_backend()


SIZES_V4 = [1, 2, 100, 512, 1472, 1473, 4096, 9000, 32768, 65000, 65507]


def test_sizes_1_byte_to_ipv4_maximum_intact(backend: UdpBackend, make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint])
    with client() as sock:
        for size in SIZES_V4:
            payload = os.urandom(size)
            sock.sendto(payload, ("127.0.0.1", proxy.port))
            reply, source = sock.recvfrom(70000)
            assert len(reply) == size
            assert reply == payload
            assert source == ("127.0.0.1", proxy.port)
    assert [len(data) for data, _ in backend.received] == SIZES_V4
    assert proxy.datagrams("upstream") == len(SIZES_V4)
    assert proxy.datagrams("downstream") == len(SIZES_V4)
    assert proxy.flows == 1


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_ipv6_maximum_datagram_intact(make_backend: MakeBackend, make_proxy: MakeProxy) -> None:
    backend = make_backend("::1")
    proxy = make_proxy([backend.endpoint], listen_host="::1")
    with client("::1") as sock:
        for size in (1, 1452, 65507, 65527):
            payload = os.urandom(size)
            sock.sendto(payload, ("::1", proxy.port))
            reply, source = sock.recvfrom(70000)
            assert reply == payload
            assert source[:2] == ("::1", proxy.port)


def test_a_datagram_too_big_for_the_header_is_counted(backend: UdpBackend,
                                                      make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint], proxy_protocol=ProxyProtocol.V2, responses=1)
    with client() as sock:
        sock.sendto(os.urandom(65507), ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.dropped("too_big") == 1, what="too_big drop")
        # Nothing went out: no flow is kept for its idle timeout, waiting for a reply.
        assert proxy.flows == 0
        assert proxy.closed_flows == [(sock.getsockname(), str(backend.endpoint), "error")]
        sock.sendto(b"small", ("127.0.0.1", proxy.port))
        echoed = sock.recvfrom(70000)[0]  # the client is served after the drop
    assert echoed[parse_v2(echoed).header_len:] == b"small"


def test_1000_clients_interleaved_each_get_only_their_own_replies(
        backend: UdpBackend, make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint])
    clients = [client() for _ in range(1000)]
    try:
        for round_ in range(2):
            for start in range(0, len(clients), 100):  # waves bound what sits in buffers
                wave = clients[start:start + 100]
                payloads = [f"{round_}:{start + i}:".encode() + os.urandom(16)
                            for i in range(len(wave))]
                for sock, payload in zip(wave, payloads, strict=True):
                    sock.sendto(payload, ("127.0.0.1", proxy.port))
                for sock, payload in zip(wave, payloads, strict=True):
                    assert sock.recvfrom(2048)[0] == payload
        assert proxy.flows == 1000
        assert proxy.datagrams("upstream") == 2000
        assert proxy.datagrams("downstream") == 2000
        # Each client's two datagrams reached the backend from one flow socket, its own.
        sources: dict[bytes, set[Any]] = {}
        for data, source in backend.received:
            sources.setdefault(data.split(b":")[1], set()).add(source)
        assert len(sources) == 1000
        assert all(len(s) == 1 for s in sources.values())
        assert len({next(iter(s)) for s in sources.values()}) == 1000
    finally:
        for sock in clients:
            sock.close()


def test_many_replies_to_one_request(make_backend: MakeBackend, make_proxy: MakeProxy) -> None:
    backend = make_backend(handler=lambda data, _: [data + b"#%d" % i for i in range(5)])
    proxy = make_proxy([backend.endpoint])
    with client() as sock:
        sock.sendto(b"ask", ("127.0.0.1", proxy.port))
        replies = [sock.recvfrom(2048)[0] for _ in range(5)]
    assert replies == [b"ask#%d" % i for i in range(5)]
    assert proxy.datagrams("downstream") == 5


def test_idle_flow_expires_then_a_new_flow_serves(backend: UdpBackend,
                                                  make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint], idle_timeout=2.0)  # outlasts a stalled test thread
    with client() as sock:
        sock.sendto(b"one", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"one"
        assert proxy.flows == 1
        wait_for(lambda: proxy.flows == 0, what="the idle flow to expire")
        assert [result for _, _, result in proxy.closed_flows] == ["expired"]
        assert proxy.closed_flows[0][0] == sock.getsockname()
        sock.sendto(b"two", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"two"
        assert proxy.flows == 1
    first, second = (source for _, source in backend.received)
    assert first != second  # a new flow socket


def test_replies_keep_a_flow_alive(make_backend: MakeBackend, make_proxy: MakeProxy) -> None:
    """Traffic in the backend → client direction alone refreshes the idle timeout."""
    backend = make_backend(handler=lambda data, _: [data])
    proxy = make_proxy([backend.endpoint], idle_timeout=1.0)
    with client() as sock:
        sock.sendto(b"hello", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"hello"
        flow_source = backend.received[0][1]
        # Push replies directly from the backend to the flow socket, never from the client,
        # one every 0.1 s of the proxy's clock for three idle timeouts.
        start = proxy.run(proxy.loop.time)
        for count in range(30):
            backend.sock.sendto(b"push%d" % count, flow_source)
            assert sock.recvfrom(2048)[0] == b"push%d" % count
            assert proxy.flows == 1, f"flow expired despite replies after {count} pushes"
            wait_for(partial(clock_reached, proxy, start + (count + 1) * 0.1),
                     what="the proxy clock to advance")
    assert proxy.closed_flows == []


def clock_reached(proxy: UdpProxy, when: float) -> bool:
    return proxy.run(proxy.loop.time) >= when


def test_max_flows_evicts_the_least_recently_active(backend: UdpBackend,
                                                    make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint], max_flows=3)
    clients = [client() for _ in range(5)]
    try:
        for i, sock in enumerate(clients):
            sock.sendto(b"c%d" % i, ("127.0.0.1", proxy.port))
            assert sock.recvfrom(2048)[0] == b"c%d" % i
        assert proxy.flows == 3
        assert proxy.dropped("evicted") == 2
        evicted = [c for c, _, result in proxy.closed_flows if result == "evicted"]
        assert evicted == [clients[0].getsockname(), clients[1].getsockname()]
        # Client 2 is now the oldest; client 0 comes back and evicts it.
        clients[0].sendto(b"again", ("127.0.0.1", proxy.port))
        assert clients[0].recvfrom(2048)[0] == b"again"
        assert proxy.closed_flows[-1][0] == clients[2].getsockname()
        assert proxy.flows == 3
    finally:
        for sock in clients:
            sock.close()


def test_evictions_not_yet_logged_are_logged_when_the_forward_stops(
        backend: UdpBackend, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    # The first eviction is logged at once, the next ones at most every interval: those
    # of the last interval must still reach the log when the forward stops.
    proxy = make_proxy([backend.endpoint], max_flows=1)
    clients = [client() for _ in range(4)]
    try:
        with caplog.at_level(logging.WARNING, logger="portproxy"):
            for i, sock in enumerate(clients):
                sock.sendto(b"c%d" % i, ("127.0.0.1", proxy.port))
                assert sock.recvfrom(2048)[0] == b"c%d" % i
            assert proxy.dropped("evicted") == 3
            proxy.close()
        said = [r.getMessage() for r in caplog.records if "max-flows 1 reached" in r.getMessage()]
        assert said == ["forward test: max-flows 1 reached; evicted 1 least recently active "
                        "flow(s)",
                        "forward test: max-flows 1 reached; evicted 2 least recently active "
                        "flow(s)"]
    finally:
        for sock in clients:
            sock.close()


def test_a_flood_of_clients_stays_within_max_flows(backend: UdpBackend,
                                                   make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint], max_flows=50)
    flood = [client() for _ in range(500)]
    try:
        for sock in flood:
            sock.sendto(b"x", ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.datagrams("upstream") + proxy.dropped("overload") >= 500,
                 what="the flood to be processed")
        assert proxy.flows <= 50
        assert proxy.dropped("evicted") >= 450 - proxy.dropped("overload")
        with client() as sock:  # the listener still serves
            sock.sendto(b"after", ("127.0.0.1", proxy.port))
            assert sock.recvfrom(2048)[0] == b"after"
    finally:
        for sock in flood:
            sock.close()


def test_icmp_refused_keeps_the_flow_and_the_listener(make_backend: MakeBackend,
                                                      make_proxy: MakeProxy) -> None:
    backend = make_backend()
    port = backend.port
    proxy = make_proxy([backend.endpoint])
    with client() as sock:
        sock.sendto(b"before", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"before"
        flow_source = backend.received[0][1]
        backend.close()
        sock.sendto(b"into the void", ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.dropped("refused") >= 1, what="the ICMP refusal to be counted")
        assert proxy.flows == 1
        restarted = make_backend(port=port)
        sock.sendto(b"after", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"after"
    assert restarted.received == [(b"after", flow_source)]  # the same flow socket
    assert proxy.flows == 1


def closed_port() -> Endpoint:
    """A loopback UDP port nobody listens on: datagrams to it draw ICMP port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return Endpoint("127.0.0.1", probe.getsockname()[1])


def test_a_refused_flow_moves_to_an_endpoint_that_answers(make_backend: MakeBackend,
                                                          make_proxy: MakeProxy) -> None:
    # A flow used to stay on an endpoint refusing its datagrams until its idle timeout,
    # and round robin kept giving new clients to it: a client retrying from its port, as
    # resolvers do, was trapped there.
    live = make_backend()
    dead = closed_port()
    proxy = make_proxy([dead, live.endpoint])
    clients = [client() for _ in range(4)]
    try:
        for n, sock in enumerate(clients):  # round robin: the first client goes to `dead`
            refused, first = proxy.dropped("refused"), b"first %d" % n

            def answered_or_refused(refused: float = refused, first: bytes = first) -> bool:
                return proxy.dropped("refused") > refused or any(
                    d == first for d, _ in list(live.received))
            sock.sendto(first, ("127.0.0.1", proxy.port))
            wait_for(answered_or_refused, what="an answer or a refusal")
            if proxy.dropped("refused") > refused:
                sock.sendto(b"retry %d" % n, ("127.0.0.1", proxy.port))
                assert sock.recvfrom(2048)[0] == b"retry %d" % n
            else:
                assert sock.recvfrom(2048)[0] == first
        # Every client was answered by its first datagram or, once refused, by its retry
        # (later clients skip `dead` while it is benched: 1 s, so not counted on here).
        assert proxy.dropped("refused") >= 1
        assert proxy.flows == 4
    finally:
        for sock in clients:
            sock.close()


def test_a_refusal_ends_a_flow_awaiting_no_other_reply(make_proxy: MakeProxy) -> None:
    # responses=N: a refused datagram will have no reply. Its flow used to wait for one
    # until the idle timeout: a DNS proxy whose backend is down held a socket and a
    # max-flows place for every query.
    proxy = make_proxy([closed_port()], responses=1)
    with client() as sock:
        sock.sendto(b"query", ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.flows == 0, what="the refused flow to end")
    assert proxy.dropped("refused") == 1
    assert [result for _, _, result in proxy.closed_flows] == ["refused"]


def test_a_refusal_keeps_a_flow_still_awaiting_a_reply(make_backend: MakeBackend,
                                                      make_proxy: MakeProxy) -> None:
    # An ICMP error does not end a flow (the design's contract): with responses=1, the
    # first query (unanswered so far) may still be answered; the refused second one
    # counts as answered by nothing. A flow ending on the first refusal whatever it still
    # awaited would break that.
    backend = make_backend(handler=lambda data, _source: [])
    proxy = make_proxy([backend.endpoint], responses=1)
    with client() as sock:
        sock.sendto(b"A", ("127.0.0.1", proxy.port))
        wait_for(lambda: backend.received, what="the first query to arrive")
        backend.close()
        sock.sendto(b"AAAA", ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.dropped("refused") == 1, what="the refusal to be counted")
        assert proxy.flows == 1  # decided with the count, in the same callback
        sock.sendto(b"AAAA again", ("127.0.0.1", proxy.port))  # a retry, refused too
        wait_for(lambda: proxy.dropped("refused") == 2, what="the second refusal")
        assert proxy.flows == 1  # still one awaited: the first query's
    assert proxy.closed_flows == []


@pytest.mark.parametrize("noticed_on", ["read", "send"])
def test_replies_queued_before_a_refusal_are_relayed(make_backend: MakeBackend,
                                                     make_proxy: MakeProxy,
                                                     noticed_on: str) -> None:
    # The kernel reports a pending ICMP error before the replies already queued on the
    # flow's socket: on the next read, or on the next send when a client datagram is
    # handled first. Acting on it at once (moving the flow to the other endpoint closes
    # the socket) lost them; so did reading only a poller batch (64) of them.
    answer, answered = threading.Event(), threading.Event()

    def held(data: bytes, source: tuple[str, int]) -> list[bytes]:
        answer.wait(30)
        for i in range(100):
            dying.sock.sendto(b"late %d" % i, source)
        answered.set()
        return []

    dying, live = make_backend(handler=held), make_backend()
    proxy = make_proxy([dying.endpoint])
    with client() as sock:
        sock.sendto(b"question", ("127.0.0.1", proxy.port))
        wait_for(lambda: dying.received, what="the question to arrive")
        proxy.set_endpoints([dying.endpoint, live.endpoint])  # somewhere to move to
        release = threading.Event()
        blocked = threading.Event()

        def block_the_loop() -> None:  # the replies and the refusal land while it waits
            blocked.set()
            release.wait(30)
            flow = next(f for _, f in proxy.engine.table.items())
            flow.sock.send(b"probe")  # to the closed port: ICMP port unreachable

        proxy.loop.call_soon_threadsafe(block_the_loop)
        assert blocked.wait(30)
        if noticed_on == "send":  # ready before the flow's socket: handled first
            sock.sendto(b"next", ("127.0.0.1", proxy.port))
            wait_for(lambda: queued(proxy.engine.listeners["127.0.0.1"]),
                     what="the datagram to wait on the listener")
        answer.set()
        assert answered.wait(30)  # on loopback, sent is delivered: all wait on the flow
        assert queued(flow_socket(proxy))
        dying.close()
        release.set()
        late = [sock.recvfrom(2048)[0] for _ in range(100)]
        assert late == [b"late %d" % i for i in range(100)]
        wait_for(lambda: proxy.dropped("refused") == 1, what="the refusal to be counted")
        if noticed_on == "read":
            sock.sendto(b"next", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"next"  # moved: the live endpoint answered
    assert proxy.datagrams("downstream") == 101


def flow_socket(proxy: UdpProxy) -> socket.socket:
    """The (only) flow's socket, read from outside the loop, which is blocked meanwhile."""
    return next(f for _, f in proxy.engine.table.items()).sock


@pytest.mark.parametrize("listen_host", ["", "0.0.0.0"], ids=["dual-stack", "ipv4-any"])
def test_replies_leave_from_the_address_the_client_sent_to(
        backend: UdpBackend, make_proxy: MakeProxy, listen_host: str) -> None:
    proxy = make_proxy([backend.endpoint], listen_host=listen_host)
    for local in ("127.0.0.2", "127.0.0.1", "127.0.0.3"):
        with client("127.0.0.1") as sock:
            sock.sendto(local.encode(), (local, proxy.port))
            reply, source = sock.recvfrom(2048)
            assert reply == local.encode()
            assert source == (local, proxy.port)


def test_one_client_moving_between_local_addresses(backend: UdpBackend,
                                                   make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint], listen_host="0.0.0.0")
    with client("127.0.0.1") as sock:
        for local in ("127.0.0.2", "127.0.0.3", "127.0.0.2"):
            sock.sendto(b"hi", (local, proxy.port))
            assert sock.recvfrom(2048)[1] == (local, proxy.port)
    assert proxy.flows == 1


def test_a_listener_bound_to_one_address_replies_from_it(backend: UdpBackend,
                                                        make_proxy: MakeProxy) -> None:
    # No pktinfo on such a listener: the kernel's source for its replies is its address.
    proxy = make_proxy([backend.endpoint], listen_host="127.0.0.2")
    with client("127.0.0.1") as sock:
        for payload in (b"one", b"two"):
            sock.sendto(payload, ("127.0.0.2", proxy.port))
            assert sock.recvfrom(2048) == (payload, ("127.0.0.2", proxy.port))
    assert proxy.flows == 1


@pytest.mark.parametrize("listen_host", ["", "0.0.0.0"], ids=["dual-stack", "ipv4-any"])
def test_allowlist_drops_and_counts_other_clients(
        backend: UdpBackend, make_proxy: MakeProxy, listen_host: str) -> None:
    import ipaddress

    proxy = make_proxy([backend.endpoint], listen_host=listen_host,
                       allow=(ipaddress.ip_network("127.0.0.1/32"),))
    with client("127.0.0.2") as denied, client("127.0.0.1") as allowed:
        for i in range(3):
            denied.sendto(b"no%d" % i, ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.dropped("denied") == 3, what="three denied datagrams")
        allowed.sendto(b"yes", ("127.0.0.1", proxy.port))
        assert allowed.recvfrom(2048)[0] == b"yes"
        denied.setblocking(False)
        with pytest.raises(BlockingIOError):
            denied.recvfrom(2048)
    assert [data for data, _ in backend.received] == [b"yes"]
    assert proxy.flows == 1


def test_no_endpoints_drops_and_counts(backend: UdpBackend, make_proxy: MakeProxy) -> None:
    proxy = make_proxy([])
    with client() as sock:
        sock.sendto(b"nobody", ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.dropped("no_endpoints") == 1, what="no_endpoints drop")
        proxy.set_endpoints([backend.endpoint])
        sock.sendto(b"somebody", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"somebody"
    assert proxy.flows == 1


def test_a_flow_moves_when_its_endpoint_disappears(make_backend: MakeBackend,
                                                   make_proxy: MakeProxy) -> None:
    first = make_backend(handler=lambda data, _: [b"first:" + data])
    second = make_backend(handler=lambda data, _: [b"second:" + data])
    proxy = make_proxy([first.endpoint])
    with client() as sock:
        sock.sendto(b"a", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"first:a"
        proxy.set_endpoints([first.endpoint, second.endpoint])  # still there: flow stays
        sock.sendto(b"b", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"first:b"
        proxy.set_endpoints([second.endpoint])
        sock.sendto(b"c", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"second:c"
    assert proxy.flows == 1
    assert proxy.run(lambda: dict(proxy.engine.target.active)) == {second.endpoint.key: 1}


def test_flow_closed_when_no_endpoint_is_left(backend: UdpBackend,
                                              make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint])
    with client() as sock:
        sock.sendto(b"a", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"a"
        proxy.set_endpoints([])
        sock.sendto(b"b", ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.flows == 0, what="the flow to close")
    assert proxy.closed_flows[-1][2] == "no_endpoints"
    assert proxy.run(lambda: dict(proxy.engine.target.active)) == {}


def test_metrics_and_endpoint_accounting(backend: UdpBackend, make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint])
    with client() as sock:
        sock.sendto(b"12345", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"12345"
    text = proxy.run(proxy.metrics.registry.render)
    assert 'portproxy_udp_flows_active{forward="test"} 1' in text
    assert 'portproxy_udp_datagrams_total{forward="test",direction="upstream"} 1' in text
    assert 'portproxy_bytes_total{forward="test",direction="downstream"} 5' in text
    assert proxy.run(lambda: dict(proxy.engine.target.active)) == {backend.endpoint.key: 1}


def test_tcp_listener_on_the_same_port_is_unaffected(backend: UdpBackend,
                                                     make_proxy: MakeProxy) -> None:
    """tcp+udp: the UDP socket binds beside a TCP listener on the same port."""
    for _ in range(20):  # the TCP port's UDP twin may be taken by someone else: pick again
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            tcp.listen()
            port = tcp.getsockname()[1]
            try:
                proxy = make_proxy([backend.endpoint], listen_port=port)
            except SetupError:
                continue
            with client() as sock:
                sock.sendto(b"both", ("127.0.0.1", port))
                assert sock.recvfrom(2048)[0] == b"both"
            with socket.create_connection(("127.0.0.1", port), timeout=10):
                pass  # the TCP listener still accepts
            assert proxy.port == port
            return
    pytest.fail("no port free for both TCP and UDP")


def test_endpoint_is_an_ipv6_backend_behind_an_ipv4_listener(
        make_backend: MakeBackend, make_proxy: MakeProxy) -> None:
    if not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback here")
    backend = make_backend("::1")
    proxy = make_proxy([Endpoint("::1", backend.port)])
    with client() as sock:
        sock.sendto(b"six", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"six"


def test_removing_a_listener_closes_its_flows_only(backend: UdpBackend,
                                                   make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint])
    proxy.run(lambda: proxy.engine.add_listener("127.0.0.2"))
    second_port = proxy.run(lambda: proxy.engine.listeners["127.0.0.2"].getsockname()[1])
    with client() as first, client() as second:
        first.sendto(b"one", ("127.0.0.1", proxy.port))
        assert first.recvfrom(2048)[0] == b"one"
        second.sendto(b"two", ("127.0.0.2", second_port))
        assert second.recvfrom(2048) == (b"two", ("127.0.0.2", second_port))
        proxy.run(lambda: proxy.engine.remove_listener("127.0.0.2"))
        assert proxy.closed_flows == [(second.getsockname(), str(backend.endpoint),
                                       "listener_removed")]
        first.sendto(b"three", ("127.0.0.1", proxy.port))
        assert first.recvfrom(2048)[0] == b"three"
    assert proxy.flows == 1
    assert proxy.run(lambda: proxy.engine.bound)


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_ipv6_allowlist_on_a_dual_stack_listener(backend: UdpBackend,
                                                 make_proxy: MakeProxy) -> None:
    import ipaddress

    proxy = make_proxy([backend.endpoint], listen_host="",
                       allow=(ipaddress.ip_network("::1/128"),))
    with client("::1") as six, client("127.0.0.1") as four:
        four.sendto(b"four", ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.dropped("denied") == 1, what="the IPv4 client's drop")
        six.sendto(b"six", ("::1", proxy.port))
        reply, source = six.recvfrom(2048)
    assert (reply, source[:2]) == (b"six", ("::1", proxy.port))
    assert [data for data, _ in backend.received] == [b"six"]


def queued(sock: socket.socket) -> int:
    """Bytes of the next datagram waiting in ``sock`` (0 when none): FIONREAD on UDP."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


@pytest.mark.parametrize("listen_host", ["127.0.0.1", ""], ids=["bound", "dual-stack"])
def test_datagrams_the_kernel_drops_on_a_full_listener_are_counted(
        make_backend: MakeBackend, make_proxy: MakeProxy, listen_host: str) -> None:
    """Stall the proxy's loop while one client sends far more than the listener's buffer
    holds: whatever the kernel dropped shows up as overload, so nothing goes uncounted. On
    the dual-stack wildcard listener the drop count rides beside two pktinfos (IPv4)."""
    sink = make_backend(handler=lambda data, _: [])
    proxy = make_proxy([sink.endpoint], listen_host=listen_host)
    stalled, release = threading.Event(), threading.Event()

    def stall() -> None:
        stalled.set()
        release.wait(60)

    sent = 0
    with client() as sock:
        try:
            proxy.loop.call_soon_threadsafe(stall)
            assert stalled.wait(10)
            payload = os.urandom(1400)
            for _ in range(8000):  # ~11 MB against an 8 MiB buffer
                sock.sendto(payload, ("127.0.0.1", proxy.port))
                sent += 1
        finally:
            release.set()
        listener = proxy.engine.listeners[listen_host]
        wait_for(lambda: queued(listener) == 0, what="the proxy to empty its listener")
        # Drop counts ride on datagrams queued after the drops: one more brings the total.
        sock.sendto(b"last", ("127.0.0.1", proxy.port))
        sent += 1
        wait_for(lambda: proxy.datagrams("upstream") + proxy.dropped("overload") == sent,
                 what="every datagram relayed or counted")
    assert proxy.dropped("overload") > 0


def test_replies_the_kernel_drops_on_a_full_flow_socket_are_counted(
        backend: UdpBackend, make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint])
    stalled, release = threading.Event(), threading.Event()

    def stall() -> None:
        stalled.set()
        release.wait(60)

    with client() as sock:
        sock.sendto(b"open", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"open"
        flow_source = backend.received[0][1]
        flow = proxy.run(lambda: proxy.engine.table.peek(sock.getsockname()))
        assert flow is not None
        flow_sock = flow.sock
        sent = 1
        try:
            proxy.loop.call_soon_threadsafe(stall)
            assert stalled.wait(10)
            burst = os.urandom(1400)
            for _ in range(3000):  # ~4 MB of replies against a 2 MiB flow buffer
                backend.sock.sendto(burst, flow_source)
                sent += 1
        finally:
            release.set()
        wait_for(lambda: queued(flow_sock) == 0, what="the proxy to empty the flow socket")
        backend.sock.sendto(b"last", flow_source)  # carries the final drop count
        sent += 1
        wait_for(lambda: proxy.datagrams("downstream") + proxy.dropped("overload") == sent,
                 what="every reply relayed or counted")
    assert proxy.dropped("overload") > 0


def replies(count: int) -> Callable[[bytes, tuple[Any, ...]], list[bytes]]:
    """A backend handler answering each datagram with ``count`` numbered replies."""
    def handler(data: bytes, _source: tuple[Any, ...]) -> list[bytes]:
        return [data + f"#{i}".encode() for i in range(count)]
    return handler


def test_responses_ends_a_flow_at_its_last_expected_reply(make_backend: MakeBackend,
                                                         make_proxy: MakeProxy) -> None:
    backend = make_backend(handler=replies(2))
    # A long idle timeout: only the reply count can end these flows.
    proxy = make_proxy([backend.endpoint], responses=2, idle_timeout=600.0)
    with client() as sock:
        sock.sendto(b"query", ("127.0.0.1", proxy.port))
        assert {sock.recv(100), sock.recv(100)} == {b"query#0", b"query#1"}
        wait_for(lambda: proxy.flows == 0, what="the flow to end after its two replies")
        assert proxy.closed_flows == [(sock.getsockname(), str(backend.endpoint), "answered")]
        # The same client again: a new flow, served and ended the same way.
        sock.sendto(b"again", ("127.0.0.1", proxy.port))
        assert {sock.recv(100), sock.recv(100)} == {b"again#0", b"again#1"}
        wait_for(lambda: len(proxy.closed_flows) == 2, what="the second flow to end")
    assert proxy.datagrams("downstream") == 4


def test_responses_waits_for_the_replies_of_every_datagram(make_backend: MakeBackend,
                                                          make_proxy: MakeProxy) -> None:
    release = {b"first": threading.Event(), b"second": threading.Event()}

    def answer_when_released(data: bytes, _source: tuple[Any, ...]) -> list[bytes]:
        release[data].wait(10)
        return [data + b"!"]

    backend = make_backend(handler=answer_when_released)
    proxy = make_proxy([backend.endpoint], responses=1, idle_timeout=600.0)
    with client() as sock:
        sock.sendto(b"first", ("127.0.0.1", proxy.port))
        sock.sendto(b"second", ("127.0.0.1", proxy.port))
        wait_for(lambda: proxy.datagrams("upstream") == 2, what="both datagrams upstream")
        release[b"first"].set()
        assert sock.recv(100) == b"first!"
        # One reply of the two expected: the flow must still be there for the second.
        assert proxy.flows == 1 and proxy.closed_flows == []
        release[b"second"].set()
        assert sock.recv(100) == b"second!"
        wait_for(lambda: proxy.flows == 0, what="the flow to end at its last reply")
        assert [result for _, _, result in proxy.closed_flows] == ["answered"]


def test_without_responses_a_flow_outlives_its_replies(backend: UdpBackend,
                                                       make_proxy: MakeProxy) -> None:
    proxy = make_proxy([backend.endpoint], idle_timeout=600.0)
    with client() as sock:
        for i in range(3):
            sock.sendto(b"x%d" % i, ("127.0.0.1", proxy.port))
            assert sock.recv(100) == b"x%d" % i
    assert proxy.flows == 1 and proxy.closed_flows == []


@pytest.mark.parametrize("responses", [0, 1], ids=["unlimited", "responses=1"])
def test_a_reply_queued_on_a_moving_flow_is_relayed_first(
        make_backend: MakeBackend, make_proxy: MakeProxy, responses: int) -> None:
    """A reply already waiting on a flow's socket when the flow moves off its departed
    endpoint reaches the client (and the counters) instead of vanishing with the socket.

    The order is made deterministic: with the proxy's loop stalled, the old endpoint's reply
    is queued on the flow socket and the client's next datagram on the listener; the stalled
    callback then runs the listener's reader itself, ahead of the flow sockets' poller."""
    first = make_backend(handler=lambda data, _: [])  # answers by hand, below
    second = make_backend(handler=lambda data, _: [b"second:" + data])
    proxy = make_proxy([first.endpoint], responses=responses, idle_timeout=600.0)
    listener = proxy.engine.listeners["127.0.0.1"]
    stalled, release = threading.Event(), threading.Event()

    def stall_then_read_the_listener() -> None:
        stalled.set()
        release.wait(10)
        proxy.engine._on_datagram(listener, False)  # False: not a wildcard listener

    late = b"late:" + os.urandom(200)  # longer than q2: a clobbered q2 would show
    with client() as sock:
        address = sock.getsockname()
        sock.sendto(b"q1", ("127.0.0.1", proxy.port))
        wait_for(lambda: first.received, what="q1 at the first endpoint")
        flow_source = first.received[0][1]
        flow = proxy.run(lambda: proxy.engine.table.peek(address))
        assert flow is not None
        flow_sock = flow.sock
        proxy.set_endpoints([second.endpoint])  # the first endpoint leaves the target
        try:
            proxy.loop.call_soon_threadsafe(stall_then_read_the_listener)
            assert stalled.wait(10)
            first.sock.sendto(late, flow_source)  # the reply to q1, still in flight
            wait_for(lambda: queued(flow_sock) > 0, what="the reply queued on the flow socket")
            sock.sendto(b"q2", ("127.0.0.1", proxy.port))
            wait_for(lambda: queued(listener) > 0, what="q2 queued on the listener")
        finally:
            release.set()
        assert sock.recv(2048) == late
        assert sock.recv(2048) == b"second:q2"
    assert [data for data, _ in second.received] == [b"q2"]
    assert proxy.datagrams("downstream") == 2
    assert proxy.datagrams("upstream") == 2
    assert proxy.run(lambda: proxy.metrics.bytes.labels("test", "downstream").value) == (
        len(late) + len(b"second:q2"))
    reasons = ("denied", "no_endpoints", "draining", "refused", "overload", "too_big",
               "error", "evicted")
    assert {reason: proxy.dropped(reason) for reason in reasons} == dict.fromkeys(reasons, 0)
    if responses:
        # The late reply was the one q1 awaited: that flow ended answered, and q2 opened a
        # new one, exactly as if the reply had been read before q2.
        wait_for(lambda: len(proxy.closed_flows) == 2, what="both flows to end answered")
        assert proxy.closed_flows == [(address, str(first.endpoint), "answered"),
                                      (address, str(second.endpoint), "answered")]
    else:
        assert proxy.flows == 1 and proxy.closed_flows == []
    assert proxy.run(lambda: dict(proxy.engine.target.active)) == (
        {} if responses else {second.endpoint.key: 1})
