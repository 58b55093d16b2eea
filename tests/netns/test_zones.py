"""IPv6 zones (``fe80::2%eth0``) in listen addresses, targets and the admin address: the
kernel needs the interface as the scope id, which Python's 2-tuple addresses drop."""

from __future__ import annotations

import json
import sys

from tests.conftest import wait_for
from tests.netns import nsutil
from tests.netns.conftest import Veth

BACKEND = """
import socket, sys, threading
scope = socket.if_nametoindex({ifname!r})
tcp = socket.socket(socket.AF_INET6)
tcp.bind(({address!r}, {port}, 0, scope))
tcp.listen()
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
udp.bind(({address!r}, {port}, 0, scope))

def serve_udp():
    while True:
        data, peer = udp.recvfrom(65535)
        udp.sendto(b"udp:" + data, peer)

threading.Thread(target=serve_udp, daemon=True).start()
print("ready", flush=True)
while True:
    conn, _ = tcp.accept()
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
"""

CLIENT = """
import json, socket
scope = socket.if_nametoindex({ifname!r})
with socket.create_connection(({address!r} + "%" + {ifname!r}, {port}), timeout=10) as c:
    c.sendall(b"zoned tcp")
    c.shutdown(socket.SHUT_WR)
    tcp = b""
    while chunk := c.recv(65536):
        tcp += chunk
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.settimeout(10)
u.sendto(b"zoned", ({address!r}, {port}, 0, scope))
print(json.dumps({{"tcp": tcp.decode(), "udp": u.recv(100).decode()}}))
"""


def test_zoned_link_local_listen_target_and_admin(veth: Veth) -> None:
    ns = veth.ns
    ns.ip("-6", "addr", "add", "fe80::2/64", "dev", veth.left, "nodad")
    ns.ip("-6", "addr", "add", "fe80::3/64", "dev", veth.right, "nodad")
    backend = ns.popen_python(BACKEND.format(address="fe80::3", ifname=veth.right, port=7001))
    backend.expect_line(lambda line: line == "ready")
    proxy = ns.portproxy("run", "-f",
                         f"tcp+udp://[fe80::2%{veth.left}]:7000=[fe80::3%{veth.right}]:7001",
                         "--admin-address", f"[fe80::2%{veth.left}]:9753")
    wait_for(lambda: "admin endpoint on" in proxy.stderr_text()
             and "listening on tcp" in proxy.stderr_text(), what="portproxy to listen")
    assert f"listening on udp [fe80::2%{veth.left}]:7000" in proxy.stderr_text()
    result = json.loads(ns.run_python(CLIENT.format(address="fe80::2", ifname=veth.left,
                                                    port=7000)).stdout)
    assert result == {"tcp": "zoned tcp", "udp": "udp:zoned"}


def test_a_zone_that_is_no_interface_is_one_line(netns: nsutil.NetNamespace) -> None:
    done = netns.run([sys.executable, "-m", "portproxy", "check", "--offline", "-f",
                      "tcp://[fe80::2%nosuch0]:7000=127.0.0.1:1"], check=False)
    assert done.returncode == 3, done.stderr
    assert "no interface named 'nosuch0'" in done.stdout, done.stdout
    assert "Traceback" not in done.stdout + done.stderr
