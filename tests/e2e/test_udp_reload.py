"""A reload that changes a UDP forward: the replaced forward drains, and the new clients it
still receives meanwhile (SO_REUSEPORT spreads clients over both sockets) go to its
successor instead of being dropped."""

from __future__ import annotations

import signal
import socket
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


def configure(path: Path, port: int, backend: UdpBackend) -> None:
    path.write_text('admin-address = "none"\ndrain-timeout = "20s"\nforwards = '
                    f'["udp://127.0.0.1:{port}=127.0.0.1:{backend.port},idle-timeout=30s"]\n')


def ask(sock: socket.socket, port: int, payload: bytes) -> bytes:
    sock.sendto(payload, ("127.0.0.1", port))
    return sock.recv(100)


def test_new_clients_of_a_draining_replaced_forward_reach_its_successor(
        tmp_path: Path) -> None:
    port = free_port(kind=socket.SOCK_DGRAM)
    config = tmp_path / "c.toml"
    with UdpBackend(handler=tagged(b"1:")) as first, \
            UdpBackend(handler=tagged(b"2:")) as second:
        configure(config, port, first)
        proc = PortproxyProcess(["run", "--config", str(config)])
        kept = client()
        fresh = [client() for _ in range(40)]
        try:
            proc.wait_for_line(f"listening on udp 127.0.0.1:{port}")
            assert ask(kept, port, b"kept") == b"1:kept"  # a flow: the old forward drains
            configure(config, port, second)
            proc.signal(signal.SIGHUP)
            proc.wait_for_line("removed: draining")
            for i, sock in enumerate(fresh):
                sock.settimeout(ANSWER_TIMEOUT)
                assert ask(sock, port, b"%d" % i) == b"2:%d" % i, i
            # The old socket was open all along (else the test proved nothing): its flow
            # lasts until quiet for 2 s.
            assert "stopped listening on udp" not in proc.output
            wait_for(lambda: "stopped listening on udp" in proc.output, timeout=30,
                     what="the replaced forward to finish draining")
            proc.signal(signal.SIGTERM)
            assert proc.wait(20) == 0
        finally:
            proc.stop()
            for sock in [kept, *fresh]:
                sock.close()
