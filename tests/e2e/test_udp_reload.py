"""A reload that changes a UDP forward: the replaced forward drains, and the new clients it
still receives meanwhile (SO_REUSEPORT spreads clients over both sockets) go to its
successor instead of being dropped."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess
from tests.net.harness import free_port
from tests.net.udp_harness import UdpBackend, client

#: Seconds a fresh client waits for its answer; the proxy answers in milliseconds.
ANSWER_TIMEOUT = 5.0


def tagged(tag: bytes) -> Any:
    return lambda data, _source: [tag + data]


def configure(path: Path, port: int, backend: UdpBackend | str, options: str = "") -> None:
    target = backend if isinstance(backend, str) else f"127.0.0.1:{backend.port}"
    path.write_text('admin-address = "none"\ndrain-timeout = "20s"\nforwards = '
                    f'["udp://127.0.0.1:{port}={target},idle-timeout=30s{options}"]\n')


def started(proc: PortproxyProcess, port: int) -> None:
    """Listening and resolved: a datagram before the target resolves is dropped."""
    proc.wait_for_line(f"listening on udp 127.0.0.1:{port}")
    proc.wait_for_line(": endpoints [")


def ask(sock: socket.socket, port: int, payload: bytes) -> bytes:
    sock.sendto(payload, ("127.0.0.1", port))
    return sock.recv(100)


@contextlib.contextmanager
def reloaded(tmp_path: Path, old: UdpBackend, new: UdpBackend, options: str = ""
             ) -> Iterator[tuple[int, list[socket.socket]]]:
    """A UDP forward to ``old`` with a flow (so that it drains), reloaded to ``new`` with
    ``options``: (its port, 40 fresh clients) while the replaced forward drains."""
    port = free_port(kind=socket.SOCK_DGRAM)
    config = tmp_path / "c.toml"
    configure(config, port, old)
    proc = PortproxyProcess(["run", "--config", str(config)])
    kept = client()
    fresh = [client() for _ in range(40)]
    try:
        started(proc, port)
        assert ask(kept, port, b"kept").endswith(b"kept")  # a flow: the old one drains
        configure(config, port, new, options)
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("removed: draining")
        for sock in fresh:
            sock.settimeout(ANSWER_TIMEOUT)
        yield port, fresh
        # The old socket was open all along (else the test proved nothing): its flow
        # lasts until quiet for 2 s.
        assert "stopped listening on udp" not in proc.output
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
        for sock in [kept, *fresh]:
            sock.close()


def test_new_clients_of_a_draining_replaced_forward_reach_its_successor(
        tmp_path: Path) -> None:
    with UdpBackend(handler=tagged(b"1:")) as first, \
            UdpBackend(handler=tagged(b"2:")) as second, \
            reloaded(tmp_path, first, second) as (port, fresh):
        for i, sock in enumerate(fresh):
            assert ask(sock, port, b"%d" % i) == b"2:%d" % i, i


def test_handed_over_clients_get_the_successors_options(tmp_path: Path) -> None:
    """The reload sets responses=1 and clients send two queries from one port (as a
    resolver's A and AAAA): the flow must await two replies, whichever socket the kernel
    gave the client to, not end after the first with the old forward's accounting."""
    with UdpBackend(handler=tagged(b"r:")) as backend, \
            reloaded(tmp_path, backend, backend, ",responses=1") as (port, fresh):
        for i, sock in enumerate(fresh):
            sock.sendto(b"a%d" % i, ("127.0.0.1", port))
            sock.sendto(b"b%d" % i, ("127.0.0.1", port))
            assert sorted([sock.recv(100), sock.recv(100)]) == [b"r:a%d" % i, b"r:b%d" % i], i


def test_until_the_successor_resolves_the_replaced_forward_serves_every_new_client(
        tmp_path: Path) -> None:
    """The new forward binds at once (the kernel then gives it part of the new clients)
    but its target does not resolve: the old one, still accepting, serves them all."""
    port = free_port(kind=socket.SOCK_DGRAM)
    config = tmp_path / "c.toml"
    with UdpBackend(handler=tagged(b"old:")) as backend:
        configure(config, port, backend)
        proc = PortproxyProcess(["run", "--config", str(config)])
        fresh = [client() for _ in range(40)]
        try:
            started(proc, port)
            configure(config, port, "no-such-host.invalid:53")
            proc.signal(signal.SIGHUP)
            proc.wait_for_line("accepting until its successor listens")
            wait_for(lambda: proc.output.count(f"listening on udp 127.0.0.1:{port}") == 2,
                     what="the successor's socket")
            for i, sock in enumerate(fresh):
                sock.settimeout(ANSWER_TIMEOUT)
                assert ask(sock, port, b"%d" % i) == b"old:%d" % i, i
            proc.signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            proc.stop()
            for sock in fresh:
                sock.close()
