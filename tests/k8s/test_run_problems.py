"""An API problem at `run` names the forwards it affects, and /readyz says what it is."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess
from tests.k8s.conftest import ep, readyz, write_kubeconfig
from tests.k8s.fakeapi import FakeKube
from tests.net.harness import EchoServer, free_port


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_forbidden_list_names_the_forward_and_shows_in_readyz(
        fake: FakeKube, tmp_path: Path, extra: list[str]) -> None:
    backend = EchoServer()
    fake.service("web", "front", [{"name": "tcp", "port": 80, "protocol": "TCP"}])
    fake.endpoint_slice("web", "front", "front-abc", [ep("127.0.0.1")],
                        [{"name": "tcp", "port": backend.port, "protocol": "TCP"}])
    fake.deny("list", "services", "web")
    port, admin = free_port(), free_port()
    name = f"tcp/127.0.0.1:{port}"
    proc = PortproxyProcess(["run", *extra, "-f", f"tcp://127.0.0.1:{port}=web/front:80",
                             "--kubeconfig", str(write_kubeconfig(tmp_path / "kc", fake.url)),
                             "--admin-address", f"127.0.0.1:{admin}"])
    try:
        line = proc.wait_for_line("Kubernetes API forbids list on services")
        assert f"forward {name}: Kubernetes API forbids list on services in namespace " \
               "'web'" in line, line
        assert "grant list and watch on it" in line, line
        _, body = wait_for(lambda: (r := readyz(admin))[0] == 503 and "forbids" in r[1]
                                and r, what="/readyz to say why")
        assert f"forward {name} not ready: target not resolved yet: Kubernetes API forbids " \
               "list on services" in body, body
        fake.allow("list", "services", "web")
        wait_for(lambda: readyz(admin)[0] == 200, what="ready once allowed")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"granted")
            assert client.recv(7, socket.MSG_WAITALL) == b"granted"
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
        backend.close()
