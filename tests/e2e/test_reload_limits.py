"""A reload that changes the global --max-conns applies it to the running process."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.e2e.cli import PortproxyProcess
from tests.net.harness import EchoServer, free_port


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_raising_the_global_limit_by_reload_serves_waiting_clients(
        tmp_path: Path, extra: list[str]) -> None:
    backend = EchoServer()
    port = free_port()
    config = tmp_path / "c.toml"
    spec = f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}"
    config.write_text(f'admin-address = "none"\nmax-conns = 1\nforwards = ["{spec}"]\n')
    proc = PortproxyProcess(["run", "--config", str(config), *extra])
    clients: list[socket.socket] = []
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{port}")
        workers = 2 if extra else 1
        # Each worker admits one connection; the next one waits in the kernel's queue.
        for i in range(workers + 1):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            client.sendall(b"%d" % i)
            clients.append(client)
        proc.wait_for_line("global --max-conns reached")
        config.write_text(f'admin-address = "none"\nmax-conns = 10\nforwards = ["{spec}"]\n')
        proc.signal(signal.SIGHUP)
        for i, client in enumerate(clients):  # all served now, the waiting one included
            assert client.recv(1, socket.MSG_WAITALL) == b"%d" % i
        # Written by the worker (or daemon) that applied it; read from the pipe in a thread.
        proc.wait_for_line("global --max-conns now 10")
        for client in clients:
            client.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        for client in clients:
            client.close()
        proc.stop()
        backend.close()
