"""PROXY protocol end to end: HAProxy (accept-proxy) tells which client it was told about."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess
from tests.net.harness import free_port, recv_all

HAPROXY = shutil.which("haproxy")
REPORT = "%[src] %[src_port] %[dst] %[dst_port]"  # what HAProxy learned from the header
pytestmark = pytest.mark.skipif(HAPROXY is None,
                                reason="haproxy is not installed (Debian package haproxy)")


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[int]:
    """HAProxy answering every request with the client and destination it was told about."""
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(f"""
global
    maxconn 100
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend reporter
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "{REPORT}"
""")
    assert HAPROXY is not None
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"haproxy exited: {proc.stdout.read()!r}")  # type: ignore
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True
        wait_for(listening, what="haproxy to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("pump", ["splice", "copy"])
def test_haproxy_sees_the_real_client(haproxy: int, version: str, pump: str) -> None:
    listen = free_port()
    args = ["run", "-f", f"tcp://:{listen}=127.0.0.1:{haproxy},proxy-protocol={version}",
            "--admin-address", "none"]
    if pump == "copy":
        args.append("--no-splice")
    proc = PortproxyProcess(args)
    try:
        proc.wait_for_line("listening on tcp")
        for client_ip, dst_ip in (("127.0.0.2", "127.0.0.3"), ("::1", "::1")):
            family = socket.AF_INET6 if ":" in client_ip else socket.AF_INET
            with socket.socket(family) as client:
                client.settimeout(10)
                client.bind((client_ip, 0))
                client.connect((dst_ip, listen))
                client_port = client.getsockname()[1]
                client.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
                response = recv_all(client).decode()
            body = response.split("\r\n\r\n", 1)[1]
            assert body == f"{client_ip} {client_port} {dst_ip} {listen}"
        proc.signal()
        assert proc.wait(15) == 0
    finally:
        proc.stop()
