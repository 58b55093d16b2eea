"""UDP test helpers: threaded backends, the UDP engine in its own loop, and clients."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from portproxy.endpoints import Balancer, Endpoint, EndpointSet
from portproxy.metrics import ProxyMetrics
from portproxy.resolve.static import StaticResolver
from portproxy.spec import Forward, ForwardOptions, HostTarget, ListenAddress, Protocol
from portproxy.target import TargetState
from portproxy.udp import UdpForwarder
from tests.net.harness import LoopThread

T = TypeVar("T")
Handler = Callable[[bytes, tuple[Any, ...]], list[bytes]]
#: How long a test client waits for one reply before the test fails.
REPLY_TIMEOUT = 10.0


def echo(data: bytes, source: tuple[Any, ...]) -> list[bytes]:
    return [data]


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class UdpBackend:
    """A UDP server in a thread: ``handler(datagram, source)`` returns the replies to send.

    Every datagram is recorded in ``received`` with its source (the flow's socket)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, handler: Handler = echo) -> None:
        self.sock = socket.socket(family(host), socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Bursts of a thousand clients must not overflow the default 208 KiB buffer.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.bind((host, port))
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.handler = handler
        self.received: list[tuple[bytes, tuple[Any, ...]]] = []
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.host, self.port)

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self.sock, self._wake_r], [], [])
            if self._wake_r in ready:
                return
            data, source = self.sock.recvfrom(65536)
            self.received.append((data, source))
            for reply in self.handler(data, source):
                self.sock.sendto(reply, source)

    def __enter__(self) -> UdpBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._wake_w.fileno() < 0:
            return  # closed already (tests stop backends on purpose)
        self._wake_w.send(b"x")
        self._thread.join(10)
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()


ProxyOn = Callable[..., "UdpProxy"]
"""``UdpProxy`` with the event loop already chosen (the ``proxy_on`` fixture)."""


class UdpProxy(LoopThread):
    """A ``UdpForwarder`` running in a private event loop on a background thread."""

    def __init__(self, endpoints: list[Endpoint], listen_host: str = "127.0.0.1",
                 listen_port: int = 0,
                 loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
                 **options: Any) -> None:
        super().__init__(loop_factory)
        self.metrics = ProxyMetrics()
        self.closed_flows: list[tuple[tuple[str, int], str, str]] = []
        first = endpoints[0] if endpoints else Endpoint("127.0.0.1", 9)
        self.forward = Forward(
            spec="test", protocols=(Protocol.UDP,),
            listen=ListenAddress("ip" if listen_host else "any", listen_host, listen_port),
            target=HostTarget(first.host, first.port),
            options=ForwardOptions(name="test", **options),
        )

        async def build() -> UdpForwarder:
            assert isinstance(self.forward.target, HostTarget)
            target = TargetState("test", StaticResolver(self.forward.target),
                                 Balancer(self.forward.options.balance))
            target.update(EndpointSet.of(endpoints))
            engine = UdpForwarder(self.forward, target, self.metrics, self._access)
            engine.add_listener(listen_host)
            return engine

        try:
            self.engine = self.call(build())
        except BaseException:
            self._stop_loop()
            raise
        self.port: int = self.engine.listeners[listen_host].getsockname()[1]

    def _access(self, forward: str, client: tuple[str, int], endpoint: str, up: int, down: int,
                duration: float, result: str) -> None:
        self.closed_flows.append((client, endpoint, result))

    def dropped(self, reason: str) -> float:
        return self.run(lambda: self.metrics.udp_dropped.labels("test", reason).value)

    def datagrams(self, direction: str) -> float:
        return self.run(lambda: self.metrics.udp_datagrams.labels("test", direction).value)

    @property
    def flows(self) -> int:
        return self.run(lambda: self.engine.flows)

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        self.run(lambda: self.engine.target.update(EndpointSet.of(endpoints)))

    def __enter__(self) -> UdpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.engine.drain(0))
        finally:
            self._stop_loop()


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``asyncio``'s loop, or uvloop's (the ``fast`` extra) when installed; None if not."""
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def client(host: str = "127.0.0.1") -> socket.socket:
    """A client socket bound to ``host`` on a fresh port, with a bounded wait for replies."""
    sock = socket.socket(family(host), socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((host, 0))
    sock.settimeout(REPLY_TIMEOUT)
    return sock


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True
