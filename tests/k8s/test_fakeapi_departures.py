"""The fake API server itself: a client that leaves is quiet, a bug in a handler is not.

Clients under test drop connections all the time (aborted watches, pooled connections
reset, a TLS handshake refused for an unknown CA). Those must end the request silently,
or their tracebacks bury real failures. An exception from the fake's own code, though,
must be kept and fail the test that owns the server.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.k8s.fakeapi import FakeKube, Request
from tests.k8s.test_incluster_tls import make_ca_and_cert

TOKEN = "test-token"
WATCH = "/api/v1/namespaces/web/configmaps?watch=1"
LIST = "/api/v1/namespaces/web/configmaps"


def get(sock: socket.socket, path: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: fake\r\nAuthorization: Bearer {TOKEN}\r\n"
                 "Accept: application/json\r\n\r\n".encode())


def read_until(sock: socket.socket, marker: bytes, timeout: float = 10.0) -> bytes:
    return _read(sock, b"", lambda data: marker in data, f"{marker!r}", timeout)


def read_response(sock: socket.socket) -> bytes:
    """One complete Content-Length response, so the connection is idle (kept alive) after."""
    data = read_until(sock, b"\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    _read(sock, body, lambda received: len(received) >= length, "the end of the body")
    return head


def _read(sock: socket.socket, data: bytes, enough: Callable[[bytes], bool], what: str,
          timeout: float = 10.0) -> bytes:
    """Receive onto ``data`` until ``enough(data)``; fail on a timeout or an early close."""
    deadline = time.monotonic() + timeout
    while not enough(data):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {what}; got {data!r}")
        sock.settimeout(remaining)
        piece = sock.recv(65536)
        if not piece:
            raise AssertionError(f"connection closed before {what}; got {data!r}")
        data += piece
    return data


def reset(sock: socket.socket) -> None:
    """Leave the way a killed client does: RST, not FIN, so the server's next I/O fails."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def departed(fake: FakeKube, count: int) -> None:
    wait_for(lambda: fake.departures >= count, what=f"{count} departures")


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to make a throw-away CA (apt-get install openssl)")
    yield make_ca_and_cert(tmp_path / "pki", "fakeapi-test-ca")


def test_clients_that_vanish_are_quiet_and_not_errors(capfd: pytest.CaptureFixture[str]) -> None:
    fake = FakeKube(token=TOKEN)
    with fake.serving():
        fake.configmap("web", "first", {"k": "v"})

        # Mid-watch: the first event has arrived, then the client dies; the server's next
        # writes (new events, the end of the stream) go to a reset socket.
        watcher = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
        get(watcher, WATCH)
        read_until(watcher, b'"first"')
        reset(watcher)
        for i in range(3):
            fake.configmap("web", f"more-{i}", {"k": "v"})
        departed(fake, 1)
        wait_for(lambda: fake.active_watches() == 0, what="the watch to end")

        # Before the response: the request was read, the client left while the API stalled.
        fake.hang_requests(True)
        impatient = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
        get(impatient, LIST)
        wait_for(lambda: fake.count("list") == 1, what="the list request to be read")
        reset(impatient)
        fake.hang_requests(False)
        departed(fake, 2)

        # Between requests: a pooled keep-alive connection is reset while idle.
        pooled = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
        get(pooled, LIST)
        assert read_response(pooled).startswith(b"HTTP/1.1 200")
        reset(pooled)
        departed(fake, 3)

        # Still connected when the server stops: stop() cuts these, also not an error.
        idle = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
        get(idle, LIST)
        read_response(idle)
        streaming = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
        get(streaming, WATCH)
        read_until(streaming, b'"more-2"')
    idle.close()
    streaming.close()

    assert fake.errors == []
    _, err = capfd.readouterr()
    assert err == ""


def test_refused_tls_handshake_and_tls_drop_are_quiet(
        pki: tuple[Path, Path, Path], tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    ca, cert, key = pki
    other_ca, _, _ = make_ca_and_cert(tmp_path / "other", "some-other-ca")
    fake = FakeKube(token=TOKEN, tls=(str(cert), str(key)))
    with fake.serving():
        fake.configmap("web", "first", {"k": "v"})

        distrustful = ssl.create_default_context(cafile=str(other_ca))
        with (socket.create_connection(("127.0.0.1", fake.port), timeout=10) as raw,
              pytest.raises(ssl.SSLCertVerificationError)):
            distrustful.wrap_socket(raw, server_hostname="127.0.0.1")
        departed(fake, 1)

        trusting = ssl.create_default_context(cafile=str(ca))
        raw = socket.create_connection(("127.0.0.1", fake.port), timeout=10)
        watcher = trusting.wrap_socket(raw, server_hostname="127.0.0.1")
        get(watcher, WATCH)
        read_until(watcher, b'"first"')
        reset(watcher)  # TLS cannot peek for EOF: only the next write notices
        fake.configmap("web", "second", {"k": "v"})
        departed(fake, 2)

    assert fake.errors == []
    _, err = capfd.readouterr()
    assert err == ""


class BuggyFake(FakeKube):
    """The fake with a bug planted in one code path (subclassed, not mocked)."""

    def _list(self, request: Request) -> dict[str, object]:
        raise RuntimeError("planted bug in the fake API")


def test_a_handler_bug_is_recorded_and_fails_serving(
        capfd: pytest.CaptureFixture[str]) -> None:
    fake = BuggyFake(token=TOKEN)
    with (pytest.raises(AssertionError, match="1 unexpected handler exception") as failure,
          fake.serving()):
        with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as sock:
            get(sock, LIST)
            sock.settimeout(10)
            assert sock.recv(65536) == b""  # the handler died: no response at all
        wait_for(lambda: fake.errors, what="the error to be recorded")
    assert "RuntimeError: planted bug in the fake API" in str(failure.value)
    assert len(fake.errors) == 1 and "planted bug" in fake.errors[0]
    assert fake.departures == 0
    _, err = capfd.readouterr()
    assert "planted bug in the fake API" in err  # also visible where nobody checks errors


def test_a_handler_bug_is_noted_on_a_test_that_failed_anyway() -> None:
    fake = BuggyFake(token=TOKEN)
    with (pytest.raises(ValueError, match="the test's own failure") as failure,
          fake.serving()):
        with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as sock:
            get(sock, LIST)
            sock.settimeout(10)
            sock.recv(65536)
        wait_for(lambda: fake.errors, what="the error to be recorded")
        raise ValueError("the test's own failure")
    notes = "\n".join(getattr(failure.value, "__notes__", []))
    assert "planted bug in the fake API" in notes
