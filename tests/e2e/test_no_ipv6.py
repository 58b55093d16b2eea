"""A host whose kernel has no IPv6 (booted with ipv6.disable=1) and a dual-stack Service.

socket(AF_INET6) then fails with EAFNOSUPPORT. That is the endpoint's family missing here, not
the process out of descriptors: a client must still reach the IPv4 endpoints. The kernel is
simulated for portproxy alone by a small LD_PRELOAD library, built here with the system's C
compiler, whose socket() refuses AF_INET6 as such a kernel does.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess, run_cli
from tests.e2e.preload import build_preload
from tests.k8s.conftest import ep, write_kubeconfig
from tests.k8s.fakeapi import FakeKube
from tests.net.harness import EchoServer, free_port, recv_all
from tests.net.udp_harness import UdpBackend

NO_INET6 = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <sys/socket.h>
int socket(int domain, int type, int protocol) {
    static int (*real)(int, int, int);
    if (!real) real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
    if (domain == AF_INET6) { errno = EAFNOSUPPORT; return -1; }
    return real(domain, type, protocol);
}
"""


@pytest.fixture
def no_inet6(tmp_path: Path) -> Path:
    return build_preload(tmp_path, "noinet6", NO_INET6, "simulating a kernel without IPv6")


def dual_stack_service(fake: FakeKube, name: str, protocol: str, port: int) -> None:
    """A Service whose pods are ::1 (its IPv6 slice) and 127.0.0.1 (its IPv4 slice)."""
    fake.service("web", name, [{"name": "p", "port": 80, "protocol": protocol}])
    ports = [{"name": "p", "port": port, "protocol": protocol}]
    fake.endpoint_slice("web", name, f"{name}-v6", [ep("::1")], ports, address_type="IPv6")
    fake.endpoint_slice("web", name, f"{name}-v4", [ep("127.0.0.1")], ports)


def test_without_ipv6_clients_reach_the_ipv4_endpoints(no_inet6: Path, tmp_path: Path) -> None:
    tcp_backend = EchoServer()
    udp_backend = UdpBackend()
    tcp_port, udp_port = free_port(), free_port(kind=socket.SOCK_DGRAM)
    try:
        with FakeKube().serving() as fake:
            dual_stack_service(fake, "tcp", "TCP", tcp_backend.port)
            dual_stack_service(fake, "udp", "UDP", udp_backend.port)
            kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
            proc = PortproxyProcess(
                ["run", "--kubeconfig", str(kubeconfig), "--admin-address", "none",
                 "-f", f"tcp://127.0.0.1:{tcp_port}=web/tcp:80",
                 "-f", f"udp://127.0.0.1:{udp_port}=web/udp:80"],
                env={"LD_PRELOAD": str(no_inet6)})
            try:
                proc.wait_for_line(f"listening on tcp 127.0.0.1:{tcp_port}")
                wait_for(lambda: sum("endpoints ['127.0.0.1:" in line and "[::1]:" in line
                                     for line in proc.lines) == 2,
                         what="both Services' endpoints, IPv4 and IPv6")
                # Round-robin puts ::1 first for every other client: each must still be
                # served, by the IPv4 endpoint, not reset.
                for i in range(6):
                    with socket.create_connection(("127.0.0.1", tcp_port), timeout=10) as c:
                        c.sendall(b"tcp %d" % i)
                        c.shutdown(socket.SHUT_WR)
                        assert recv_all(c) == b"tcp %d" % i
                for i in range(6):
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                        c.settimeout(10)
                        c.sendto(b"udp %d" % i, ("127.0.0.1", udp_port))
                        assert c.recv(100) == b"udp %d" % i
                assert tcp_backend.accepted == 6
                proc.wait_for_line("Address family not supported")  # it did try ::1
            finally:
                proc.stop()
    finally:
        tcp_backend.close()
        udp_backend.close()


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_an_ipv6_listen_address_without_ipv6_is_one_line_not_a_crash(
        no_inet6: Path, protocol: str) -> None:
    port = free_port()
    result = run_cli(["check", "--offline", "-f", f"{protocol}://[::]:{port}=127.0.0.1:1"],
                     env={"LD_PRELOAD": str(no_inet6)})
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert f"cannot bind [::]:{port}: this kernel has no IPv6; use an IPv4 address or '*'" \
        in output, output
    assert "Traceback" not in output
