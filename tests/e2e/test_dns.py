"""DNS end to end: ``dig`` through ``portproxy run`` to a real ``dnsmasq``, over UDP and TCP."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess
from tests.net.harness import free_tcp_udp_port, stop_process

ANSWER = "192.0.2.1"  # TEST-NET-1: what dnsmasq answers for example.test

pytestmark = pytest.mark.skipif(
    shutil.which("dig") is None or shutil.which("dnsmasq") is None,
    reason="needs dig (Debian package dnsutils) and dnsmasq (dnsmasq-base)")


def dig(server: str, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["dig", f"@{server}", "-p", str(port), "example.test", "A", "+short", "+tries=1",
         "+time=5", *extra], capture_output=True, text=True, timeout=30)


def answered(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0 and result.stdout.strip() == ANSWER


@pytest.fixture
def dnsmasq() -> Iterator[int]:
    port = free_tcp_udp_port()
    proc = subprocess.Popen(
        ["dnsmasq", "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1",
         "--bind-interfaces", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
         "--pid-file=", f"--user={pwd.getpwuid(os.getuid()).pw_name}",
         f"--address=/example.test/{ANSWER}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited {proc.returncode}: "
                                     f"{proc.stderr.read() if proc.stderr else ''}")
            return answered(dig("127.0.0.1", port, "+time=1"))
        wait_for(ready, 20, what="dnsmasq to answer")
        yield port
    finally:
        stop_process(proc, 10)


@pytest.fixture
def portproxy_processes() -> Iterator[list[PortproxyProcess]]:
    started: list[PortproxyProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.stop()


def test_dig_over_udp_and_tcp_through_one_tcp_udp_forward(
        dnsmasq: int, portproxy_processes: list[PortproxyProcess]) -> None:
    port = free_tcp_udp_port()
    # All addresses (dual-stack sockets), so that IPv4 clients arrive IPv4-mapped.
    proxy = PortproxyProcess(["run", "-f", f"tcp+udp://:{port}=127.0.0.1:{dnsmasq},"
                              "responses=1", "--admin-address", "none", "--access-log"])
    portproxy_processes.append(proxy)
    proxy.wait_for_line(f"listening on udp *:{port}")
    proxy.wait_for_line(f"listening on tcp *:{port}")

    over_udp = dig("127.0.0.1", port)
    assert answered(over_udp), over_udp.stdout + over_udp.stderr
    over_tcp = dig("127.0.0.1", port, "+tcp")
    assert answered(over_tcp), over_tcp.stdout + over_tcp.stderr
    # One client, written one way in both protocols' access log lines.
    for kind in ("udp flow closed", "tcp connection closed"):
        line = proxy.wait_for_line(kind)
        assert " client=127.0.0.1:" in line, line

    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0, proxy.output
    assert "drain finished" in proxy.output


def test_dig_accepts_replies_from_a_wildcard_listener_and_metrics_count_them(
        dnsmasq: int, portproxy_processes: list[PortproxyProcess]) -> None:
    """dig drops a reply whose source is not the address it asked ("reply from unexpected
    source"): asking 127.0.0.2 on an all-addresses listener needs IP_PKTINFO to succeed."""
    port, admin = free_tcp_udp_port(), free_tcp_udp_port()
    proxy = PortproxyProcess([
        "run", "-f", f"udp://:{port}=127.0.0.1:{dnsmasq},idle-timeout=500ms,name=dns",
        "--admin-address", f"127.0.0.1:{admin}", "--access-log"])
    portproxy_processes.append(proxy)
    proxy.wait_for_line("listening on udp")
    proxy.wait_for_line("admin endpoint on")
    # A UDP port is served from its bind, but until the target resolves its datagrams are
    # dropped (no_endpoints), and dig +tries=1 would not ask again.
    proxy.wait_for_line(": endpoints [")

    for server in ("127.0.0.2", "127.0.0.1"):
        result = dig(server, port)
        assert answered(result), f"via {server}: {result.stdout}{result.stderr}"

    proxy.wait_for_line("udp flow closed")  # the access log, once the flows went idle
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'portproxy_udp_datagrams_total{forward="dns",direction="upstream"} 2' in metrics
    assert 'portproxy_udp_datagrams_total{forward="dns",direction="downstream"} 2' in metrics
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0, proxy.output
