"""Graceful stop of the UDP engine: no new flows, in-flight replies still delivered."""

from __future__ import annotations

import asyncio
import socket
import threading

from tests.conftest import wait_for
from tests.net.udp_harness import ProxyOn, UdpBackend, client


def test_drain_delivers_in_flight_replies_and_refuses_new_clients(proxy_on: ProxyOn) -> None:
    gate = threading.Event()

    def held(data: bytes, _source: object) -> list[bytes]:
        gate.wait(30)  # the reply is "in flight" until the test opens the gate
        return [data]

    with UdpBackend(handler=held) as backend, proxy_on([backend.endpoint], listen_host="") \
            as proxy, client() as old, client() as new:
        try:
            old.sendto(b"question", ("127.0.0.1", proxy.port))
            wait_for(lambda: backend.received, what="the backend to get the question")
            drained = asyncio.run_coroutine_threadsafe(proxy.engine.drain(60), proxy.loop)
            wait_for(lambda: not proxy.run(lambda: proxy.engine.accepting), what="drain start")
            new.sendto(b"late", ("127.0.0.1", proxy.port))
            wait_for(lambda: proxy.dropped("draining") == 1, what="the new client's drop")
            gate.set()
            assert old.recvfrom(2048) == (b"question", ("127.0.0.1", proxy.port))
            drained.result(30)  # ends once the flow has been quiet, well before 60 s
        finally:
            gate.set()
        assert proxy.closed_flows == [(old.getsockname(), str(backend.endpoint), "drained")]
        assert not proxy.run(lambda: proxy.engine.bound)
        assert [data for data, _ in backend.received] == [b"question"]


def test_drain_timeout_closes_flows_that_stay_busy(proxy_on: ProxyOn) -> None:
    with UdpBackend() as backend, proxy_on([backend.endpoint]) as proxy, client() as sock:
        sock.sendto(b"start", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"start"
        drained = asyncio.run_coroutine_threadsafe(proxy.engine.drain(1.0), proxy.loop)
        served = 0
        for i in range(1000):  # keep the flow busy (never quiet) until the drain gives up
            sock.sendto(b"ping%d" % i, ("127.0.0.1", proxy.port))
            if drained.done():
                break
            try:
                reply = sock.recvfrom(2048)[0]
            except TimeoutError:
                if drained.done():  # the drain gave up between the check and the reply
                    break
                raise
            assert reply == b"ping%d" % i
            served += 1
            try:
                drained.result(0.05)
            except TimeoutError:
                continue
            break
        drained.result(10)
        assert served >= 1  # the existing flow was served during the drain
        assert proxy.closed_flows[-1][2] == "drain_timeout"
        assert proxy.flows == 0
        assert not proxy.run(lambda: proxy.engine.bound)


def test_drain_without_idle_timeout_still_ends_quiet_flows(proxy_on: ProxyOn) -> None:
    with UdpBackend() as backend, proxy_on([backend.endpoint], idle_timeout=0) as proxy, \
            client() as sock:
        sock.sendto(b"x", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"x"
        proxy.call(proxy.engine.drain(60))
        assert [result for _, _, result in proxy.closed_flows] == ["drained"]


def test_drain_with_no_flows_closes_the_listener(proxy_on: ProxyOn) -> None:
    with UdpBackend() as backend, proxy_on([backend.endpoint]) as proxy:
        proxy.call(proxy.engine.drain(60), timeout=10)
        assert not proxy.run(lambda: proxy.engine.bound)


def test_abort_all_closes_everything_at_once(proxy_on: ProxyOn) -> None:
    with UdpBackend() as backend, proxy_on([backend.endpoint]) as proxy, client() as sock:
        sock.sendto(b"x", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(2048)[0] == b"x"
        proxy.run(proxy.engine.stop_accepting)
        assert proxy.run(lambda: proxy.engine.bound)  # replies still need the listener
        proxy.run(proxy.engine.abort_all)
        assert proxy.closed_flows[-1][2] == "drain_timeout"
        assert proxy.flows == 0
        assert not proxy.run(lambda: proxy.engine.bound)
        assert proxy.run(lambda: proxy.metrics.udp_flows.labels("test").value) == 0


def test_stop_accepting_without_flows_releases_the_port_at_once(proxy_on: ProxyOn) -> None:
    with UdpBackend() as backend, proxy_on([backend.endpoint]) as proxy:
        proxy.run(proxy.engine.stop_accepting)
        assert not proxy.run(lambda: proxy.engine.bound)
        # The port is free again: a socket without SO_REUSEPORT can take it.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taker:
            taker.bind(("127.0.0.1", proxy.port))


def test_a_stopped_forward_binds_no_new_listener(proxy_on: ProxyOn) -> None:
    """As for TCP: an interface address appearing while a removed forward drains gets no
    listener from it."""
    with UdpBackend() as backend, proxy_on([backend.endpoint]) as proxy:
        proxy.run(proxy.engine.stop_accepting)
        before = proxy.run(lambda: set(proxy.engine.listeners))
        proxy.run(lambda: proxy.engine.add_listener("127.0.0.2"))
        assert proxy.run(lambda: set(proxy.engine.listeners)) == before
