"""The namespace helpers leave nothing behind, whatever the test body does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns import nsutil
from tests.netns.conftest import Veth

pytestmark = pytest.mark.root


class BodyFailed(Exception):
    pass


def alive(pid: int) -> bool:
    """Running (a reaped or zombie process is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_failing_body_still_removes_namespace_links_and_processes(
    _netns_available: None,
) -> None:
    stubborn = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "orphan = subprocess.Popen(['sleep', '300'])\n"  # outlives its parent's SIGKILL
        "print(orphan.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    with pytest.raises(BodyFailed), nsutil.netns() as ns:
        name = ns.name
        ns.add_veth("ppx0", "ppx1")
        process = ns.popen_python(stubborn)
        orphan_pid = int(process.expect_line(str.isdigit))
        assert alive(orphan_pid)
        raise BodyFailed
    assert not nsutil.namespace_exists(name)
    assert process.proc.returncode is not None  # SIGTERM ignored, so it was SIGKILLed
    assert not alive(orphan_pid)


def test_namespace_is_isolated_from_the_host(veth: Veth) -> None:
    ns = veth.ns
    inside = {link["ifname"] for link in json.loads(ns.ip("-j", "link", "show"))}
    assert inside == {"lo", "ppx0", "ppx1"}
    host = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True)
    assert "ppx0" not in {link["ifname"] for link in json.loads(host.stdout)}
    lo = json.loads(ns.ip("-j", "link", "show", "lo"))[0]
    assert "UP" in lo["flags"]


def test_processes_run_inside_the_namespace(veth: Veth) -> None:
    ns = veth.ns
    ns.ip("addr", "add", "10.50.0.1/32", "dev", "ppx0")
    server = ns.popen_python(
        "import socket\n"
        "s = socket.socket(); s.bind(('10.50.0.1', 7000)); s.listen()\n"
        "print('listening', flush=True)\n"
        "c, _ = s.accept(); c.sendall(c.recv(100)[::-1]); c.close()\n"
    )
    server.expect_line(lambda line: line == "listening")
    reply = ns.run_python(
        "import socket\n"
        "c = socket.create_connection(('10.50.0.1', 7000), timeout=10)\n"
        "c.sendall(b'portproxy'); print(c.recv(100).decode())\n"
    )
    assert reply.stdout.strip() == "yxorptrop"
    assert server.proc.wait(timeout=10) == 0  # it served exactly that one connection


REVERSE_ECHO = (
    "import socket, sys\n"
    "s = socket.socket(); s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()\n"
    "print('listening', flush=True)\n"
    "while True:\n"
    "    c, _ = s.accept(); data = b''\n"
    "    while chunk := c.recv(65536): data += chunk\n"
    "    c.sendall(data[::-1]); c.close()\n"
)


def test_portproxy_forwards_inside_the_namespace(veth: Veth) -> None:
    """The template for end-to-end tests: backend, daemon and client all in the namespace."""
    ns = veth.ns
    ns.ip("addr", "add", "10.51.0.1/32", "dev", "ppx0")
    backend = ns.popen([sys.executable, "-c", REVERSE_ECHO, "10.51.0.1", "7000"])
    backend.expect_line(lambda line: line == "listening")
    proxy = ns.portproxy(
        "run", "-f", "tcp://10.51.0.1:8080=10.51.0.1:7000", "--admin-address", "none"
    )
    ns.wait_tcp("10.51.0.1", 8080)
    payload = bytes(range(256)) * 64
    assert ns.tcp_exchange("10.51.0.1", 8080, payload) == payload[::-1]
    assert proxy.stop() == 0
    ns.wait_tcp("10.51.0.1", 8080, listening=False)
