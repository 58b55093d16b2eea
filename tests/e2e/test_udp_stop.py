"""SIGTERM with UDP flows: the listening socket stays open for their replies, and beside a
new instance (SO_REUSEPORT) the kernel keeps hashing part of the new clients to it."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from tests.e2e.cli import PortproxyProcess
from tests.e2e.test_udp_reload import ANSWER_TIMEOUT, ask, configure, started, tagged
from tests.net.harness import free_port
from tests.net.udp_harness import UdpBackend, client


def test_a_stopping_instance_serves_new_clients_until_its_socket_closes(tmp_path: Path) -> None:
    # They used to be dropped (reason="draining") for as long as any flow kept the socket
    # open, up to the drain timeout, and so were their retries from the same port.
    port = free_port(kind=socket.SOCK_DGRAM)
    config = tmp_path / "c.toml"
    with UdpBackend(handler=tagged(b"r:")) as backend, client() as kept, client() as fresh:
        configure(config, port, backend)
        proc = PortproxyProcess(["run", "--config", str(config)])
        try:
            started(proc, port)
            assert ask(kept, port, b"before") == b"r:before"
            proc.signal(signal.SIGTERM)
            proc.wait_for_line("draining 0 open connection(s) and 1 UDP flow(s)")
            assert ask(kept, port, b"during") == b"r:during"  # the flow is not quiet
            fresh.settimeout(ANSWER_TIMEOUT)
            assert ask(fresh, port, b"new") == b"r:new"
            assert proc.wait(20) == 0  # once both flows have been quiet for 2 s
        finally:
            proc.stop()
