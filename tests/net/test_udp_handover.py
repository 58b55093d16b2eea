"""Two UDP engines of one process on one address, as a reload leaves them: the replaced
one (a predecessor) and its successor, whose target has not resolved."""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from dataclasses import replace

from portproxy.endpoints import Balancer, EndpointSet
from portproxy.resolve.static import StaticResolver
from portproxy.spec import Forward, ListenAddress
from portproxy.target import TargetState
from portproxy.udp import UdpForwarder
from tests.net.harness import free_port
from tests.net.udp_harness import UdpBackend, UdpProxy, client


async def successor(proxy: UdpProxy, forward: Forward, endpoints: EndpointSet | None
                    ) -> UdpForwarder:
    """A forward replacing ``proxy``'s engine, bound beside it on 127.0.0.1; its target
    resolved to ``endpoints``, or not at all (None)."""
    target = TargetState("test", StaticResolver(forward.target),  # type: ignore[arg-type]
                         Balancer(forward.options.balance))
    if endpoints is not None:
        target.update(endpoints)
    engine = UdpForwarder(forward, target, proxy.metrics)
    engine.add_listener("127.0.0.1")
    proxy.engine.successors = [engine]
    return engine


def test_a_successor_that_cannot_resolve_leaves_its_clients_to_the_forward_it_replaces(
        ) -> None:
    port = free_port(kind=socket.SOCK_DGRAM)
    with UdpBackend(handler=lambda data, _source: [b"old:" + data]) as backend, \
            UdpProxy([backend.endpoint], listen_port=port) as proxy:
        old = proxy.engine
        forward = replace(proxy.forward, listen=ListenAddress("ip", "127.0.0.1", port))

        # Its target never resolves (no update): it binds beside the old one at once.
        new = proxy.call(successor(proxy, forward, None))
        new.predecessors = [old]
        clients = [client() for _ in range(40)]
        try:
            def every_client_answered_by_the_old_target(round_: bytes) -> None:
                for i, sock in enumerate(clients):
                    sock.sendto(round_ + b"%d" % i, ("127.0.0.1", port))
                    assert sock.recv(100) == b"old:" + round_ + b"%d" % i, i

            # The kernel spreads the clients over both sockets; the old one serves them all.
            every_client_answered_by_the_old_target(b"a")
            # The hand-over gives up (its 30 s): the old forward drains, and still finishes
            # the flows it has, also those of clients the kernel gives the new socket.
            proxy.run(old.stop_accepting)
            every_client_answered_by_the_old_target(b"b")
            assert proxy.dropped("no_endpoints") == 0
            # Drained, it is let go: the successor holds no reference to it any more.
            proxy.run(old.abort_all)
            assert proxy.run(lambda: list(new.predecessors)) == []
        finally:
            proxy.call(new.drain(0))
            for sock in clients:
                sock.close()


def queued(sock: socket.socket) -> int:
    """Bytes of the next datagram waiting in ``sock`` (0 when none): FIONREAD on UDP."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0])


def test_datagrams_queued_on_a_replaced_forward_as_it_closes_reach_the_successor() -> None:
    # SO_REUSEPORT gives the replaced forward's socket part of the new clients until it
    # closes; what waits on it then was lost, uncounted.
    port = free_port(kind=socket.SOCK_DGRAM)
    with UdpBackend(handler=lambda data, _source: [b"old:" + data]) as old_backend, \
            UdpBackend(handler=lambda data, _source: [b"new:" + data]) as new_backend, \
            UdpProxy([old_backend.endpoint], listen_port=port) as proxy:
        old = proxy.engine
        forward = replace(proxy.forward, listen=ListenAddress("ip", "127.0.0.1", port))

        new = proxy.call(successor(proxy, forward, EndpointSet.of([new_backend.endpoint])))
        clients = [client() for _ in range(40)]
        old_socket = old.listeners["127.0.0.1"]
        try:
            def send_then_close_the_replaced_forward() -> None:
                # In the loop: nothing is read meanwhile, so the old socket's share waits.
                for i, sock in enumerate(clients):
                    sock.sendto(b"q%d" % i, ("127.0.0.1", port))
                assert queued(old_socket) > 0, "the kernel gave the old socket no client"
                old.stop_accepting()  # no flows: its sockets close at once

            proxy.run(send_then_close_the_replaced_forward)
            for i, sock in enumerate(clients):
                assert sock.recv(100) == b"new:q%d" % i, i
            assert proxy.dropped("draining") == 0
        finally:
            proxy.call(new.drain(0))
            for sock in clients:
                sock.close()
