"""The default mover copies small messages and switches to splice(2) for bulk transfers."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest

from portproxy.splice import SPLICE_AFTER, AutoDirection, SpliceDirection, splice_available
from tests.net.harness import EchoServer, ProxyThread

pytestmark = pytest.mark.skipif(not splice_available()[0], reason="splice unavailable here")


class HeldBackend:
    """Accepts one connection and reads nothing until told to, so the proxy's reads of the
    client pile up in the kernel (backpressure), then reads everything."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.release = threading.Event()
        self.received = hashlib.sha256()
        self.count = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            self.release.wait(30)
            while chunk := conn.recv(1 << 20):
                self.received.update(chunk)
                self.count += len(chunk)
            conn.sendall(b"done")

    def close(self) -> None:
        self.release.set()
        self.listener.close()
        self.thread.join(10)


def directions(proxy: ProxyThread) -> tuple[SpliceDirection, SpliceDirection]:
    """(up, down) of the proxy's one relay, once it exists."""
    deadline = time.monotonic() + 10
    while True:
        relays = proxy.run(lambda: list(proxy.engine.relays))
        if relays or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(relays) == 1
    up, down = relays[0].up, relays[0].down
    assert isinstance(up, SpliceDirection) and isinstance(down, SpliceDirection)
    return up, down


def test_request_response_stays_on_the_copy_path(echo_server: EchoServer) -> None:
    proxy = ProxyThread(echo_server.port, "splice")
    try:
        with proxy.connect() as client:
            for i in range(50):
                message = f"request {i}".encode() * 20
                client.sendall(message)
                assert recv_exactly(client, len(message)) == message
            up, down = directions(proxy)
            assert up.nbytes == down.nbytes > 0
            assert type(up) is type(down) is AutoDirection  # still copying
    finally:
        proxy.close()


def test_bulk_switches_to_splice_and_every_byte_arrives_in_order() -> None:
    backend = HeldBackend()
    proxy = ProxyThread(backend.port, "splice")
    try:
        client = proxy.connect()
        client.sendall(b"hello")
        up, down = directions(proxy)  # kept: the relay is gone once both sides have closed
        # While the backend reads nothing, the client's bytes pile up in front of the proxy;
        # once it reads again, one of the proxy's reads returns far more than SPLICE_AFTER.
        payload = os.urandom(16 * SPLICE_AFTER)
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        backend.release.set()
        sender.join(30)
        client.shutdown(socket.SHUT_WR)
        assert recv_exactly(client, 4) == b"done"
        assert backend.count == 5 + len(payload)
        assert backend.received.digest() == hashlib.sha256(b"hello" + payload).digest()
        assert type(up) is SpliceDirection, "a bulk transfer should have switched to splice"
        assert type(down) is AutoDirection  # it carried four bytes
        client.close()
    finally:
        proxy.close()
        backend.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)
