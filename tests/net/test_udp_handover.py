"""Two UDP engines of one process on one address, as a reload leaves them: the replaced
one (a predecessor) and its successor, whose target has not resolved."""

from __future__ import annotations

import socket
from dataclasses import replace

from portproxy.endpoints import Balancer
from portproxy.resolve.static import StaticResolver
from portproxy.spec import ListenAddress
from portproxy.target import TargetState
from portproxy.udp import UdpForwarder
from tests.net.harness import free_port
from tests.net.udp_harness import UdpBackend, UdpProxy, client


def test_a_successor_that_cannot_resolve_leaves_its_clients_to_the_forward_it_replaces(
        ) -> None:
    port = free_port(kind=socket.SOCK_DGRAM)
    with UdpBackend(handler=lambda data, _source: [b"old:" + data]) as backend, \
            UdpProxy([backend.endpoint], listen_port=port) as proxy:
        old = proxy.engine
        forward = replace(proxy.forward, listen=ListenAddress("ip", "127.0.0.1", port))

        async def successor() -> UdpForwarder:
            # Its target never resolves (no update): it binds beside the old one at once.
            target = TargetState("test", StaticResolver(forward.target),  # type: ignore[arg-type]
                                 Balancer(forward.options.balance))
            engine = UdpForwarder(forward, target, proxy.metrics)
            engine.add_listener("127.0.0.1")
            old.successors = [engine]
            engine.predecessors = [old]
            return engine

        new = proxy.call(successor())
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
