"""Real sockets around an in-process engine: backends in threads, the proxy in its own loop."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
import subprocess
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from portproxy.endpoints import Balancer, Endpoint, EndpointSet
from portproxy.limits import SharedLimit
from portproxy.metrics import ProxyMetrics
from portproxy.pump import Direction
from portproxy.relay import direction_type
from portproxy.resolve.static import StaticResolver
from portproxy.spec import Forward, ForwardOptions, HostTarget, ListenAddress, Protocol
from portproxy.target import TargetState
from portproxy.tcp import TcpForwarder

T = TypeVar("T")


class EchoServer:
    """A threaded TCP backend: echoes every byte, then half-closes after the client does."""

    def __init__(self, host: str = "127.0.0.1", handler: Callable[[socket.socket], None] | None
                 = None, reuseport: bool = False) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.sock.bind((host, 0))
        self.sock.listen(512)
        self.host = host
        self.port: int = self.sock.getsockname()[1]
        self.handler = handler or echo
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


def echo(conn: socket.socket) -> None:
    while True:
        data = conn.recv(1 << 20)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


class LoopThread:
    """An event loop running on a background thread, driven from the test's thread."""

    def __init__(self, loop_factory: Callable[[], asyncio.AbstractEventLoop]
                 = asyncio.new_event_loop) -> None:
        self.loop = loop_factory()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()
        return self.call(wrapper())

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def mover(pump: str) -> type[Direction]:
    """The Direction class for a pump name of ``tests/net/conftest.PUMPS``."""
    if pump == "splice-only":
        from portproxy.splice import SpliceDirection

        return SpliceDirection
    return direction_type(pump == "splice")


class ProxyThread(LoopThread):
    """A ``TcpForwarder`` running in a private event loop on a background thread."""

    def __init__(self, target_port: int, pump: str, target_host: str = "127.0.0.1",
                 listen_host: str = "127.0.0.1", global_limit: int = 0, **options: Any) -> None:
        super().__init__()
        self.metrics = ProxyMetrics()
        forward = Forward(
            spec="test", protocols=(Protocol.TCP,),
            listen=ListenAddress("ip" if listen_host else "any", listen_host, 0),
            target=HostTarget(target_host, target_port),
            options=ForwardOptions(name="test", **options),
        )
        self.forward = forward
        self.endpoint = Endpoint(target_host, target_port)
        self.access: list[tuple[Any, ...]] = []
        """Access log records: (forward, client, endpoint, up, down, duration, result)."""

        async def build() -> TcpForwarder:
            target = TargetState("test", StaticResolver(forward.target),  # type: ignore[arg-type]
                                 Balancer(forward.options.balance))
            target.update(EndpointSet.of([self.endpoint]))
            engine = TcpForwarder(forward, target, self.metrics, mover(pump),
                                  SharedLimit(global_limit),
                                  lambda *record: self.access.append(record))
            engine.add_listener(listen_host)
            return engine

        self.engine = self.call(build())
        self.host = listen_host or "127.0.0.1"
        self.port: int = self.engine.listeners[listen_host].getsockname()[1]

    def counter(self, result: str) -> float:
        return self.run(lambda: self.metrics.connections.labels("test", result).value)

    def closed(self, reason: str) -> float:
        return self.run(lambda: self.metrics.closed.labels("test", reason).value)

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        self.run(lambda: self.engine.target.update(EndpointSet.of(endpoints)))

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=30)

    def close(self) -> None:
        try:
            self.call(self.engine.drain(0))
        finally:
            self._stop_loop()


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def recv_all(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


#: Ports ``free_port`` handed out lately. The kernel picks a random port for each bind to
#: port 0, and about 1 in 12,000 picks repeats the one before: a test asking for two ports
#: in a row would then get the same one twice (a clash the product rightly refuses).
_recently_given: collections.deque[int] = collections.deque(maxlen=512)


def _not_recently_given(port: int) -> bool:
    if port in _recently_given:
        return False
    _recently_given.append(port)
    return True


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free right now (it may be taken before the caller binds it: where that matters,
    hold a socket instead), distinct from those given lately in this process."""
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
        if _not_recently_given(port):
            return port


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20.0) -> None:
    """SIGTERM, and SIGKILL if it has not ended at the deadline."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def free_tcp_udp_port() -> int:
    """A loopback port free for both TCP and UDP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            if _not_recently_given(port):
                return port
    raise AssertionError("no port free for both TCP and UDP")


def assert_closed_by_proxy(host: str, port: int, source: str | None = None) -> None:
    """Connect and expect the proxy to close at once: EOF, or a reset (even during connect,
    since the RST may beat the client's own check of the handshake)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(30)
    try:
        if source is not None:
            sock.bind((source, 0))
        try:
            sock.connect((host, port))
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
    finally:
        sock.close()
