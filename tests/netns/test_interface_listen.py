"""Listening on an interface name, following its addresses; node-local VIP interfaces.

Each test owns a fresh network namespace (root); the daemon, the backend and the clients
all run inside it, so the addresses used here exist nowhere else.
"""

from __future__ import annotations

import json

from tests.conftest import wait_for
from tests.netns import nsutil
from tests.netns.conftest import Veth

BACKEND_PORT = 9000
ECHO = f"""
import socket, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", {BACKEND_PORT}))
server.listen()
print("ready", flush=True)
def handle(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


def start_backend(ns: nsutil.NetNamespace) -> None:
    backend = ns.popen_python(ECHO)
    backend.expect_line(lambda line: line == "ready")


def admin_get(ns: nsutil.NetNamespace, port: int, path: str) -> tuple[int, str]:
    code = f"""
import urllib.request, urllib.error, sys
try:
    with urllib.request.urlopen("http://127.0.0.1:{port}{path}", timeout=5) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""
    out = ns.run_python(code).stdout
    status, _, body = out.partition("\n")
    return int(status), body


def test_listens_on_interface_addresses_and_follows_changes(veth: Veth) -> None:
    ns = veth.ns
    start_backend(ns)
    ns.ip("addr", "add", "10.99.0.1/24", "dev", veth.left)
    proxy = ns.portproxy("run", "-f", f"tcp://{veth.left}/ipv4:8080=127.0.0.1:{BACKEND_PORT}",
                         "--admin-address", "127.0.0.1:9753")
    ns.wait_tcp("10.99.0.1", 8080)
    assert ns.tcp_exchange("10.99.0.1", 8080, b"first address") == b"first address"

    ns.ip("addr", "add", "10.99.1.2/24", "dev", veth.left)
    ns.wait_tcp("10.99.1.2", 8080)  # a new address gets a listener
    assert ns.tcp_exchange("10.99.1.2", 8080, b"second address") == b"second address"

    ns.ip("addr", "del", "10.99.0.1/24", "dev", veth.left)
    ns.wait_tcp("10.99.0.1", 8080, listening=False)  # a removed one loses it
    assert ns.tcp_exchange("10.99.1.2", 8080, b"still here") == b"still here"
    status, body = admin_get(ns, 9753, "/readyz")
    assert status == 200, body
    assert proxy.stop() == 0


def test_missing_interface_is_an_error_unless_waited_for(netns: nsutil.NetNamespace) -> None:
    done = netns.run([*nsutil_python(), "-m", "portproxy", "run", "-f",
                      "tcp://ppxlate:8080=127.0.0.1:9000", "--admin-address", "none"],
                     check=False)
    assert done.returncode == 3
    assert "interface ppxlate does not exist" in done.stderr

    start_backend(netns)
    proxy = netns.portproxy("run", "-f", f"tcp://ppxlate:8080=127.0.0.1:{BACKEND_PORT},"
                            "wait-interface", "--admin-address", "127.0.0.1:9753")

    def readyz() -> tuple[int, str] | None:
        try:
            return admin_get(netns, 9753, "/readyz")
        except AssertionError:
            return None
    answer = wait_for(readyz, what="the admin endpoint")
    assert answer is not None
    status, body = answer
    assert status == 503 and "waiting for interface ppxlate" in body
    assert "forward tcp/ppxlate:8080: waiting for interface ppxlate (not listening until " \
        "then)" in proxy.stderr_text()

    # The interface comes without an address first: said in the log, not only in /readyz.
    netns.ip("link", "add", "ppxlate", "type", "veth", "peer", "name", "ppxpeer")
    wait_for(lambda: "waiting for an address on interface ppxlate" in proxy.stderr_text(),
             what="the log line")
    netns.ip("addr", "add", "10.98.0.1/24", "dev", "ppxlate")
    netns.ip("link", "set", "ppxlate", "up")
    netns.ip("link", "set", "ppxpeer", "up")
    netns.wait_tcp("10.98.0.1", 8080)
    assert netns.tcp_exchange("10.98.0.1", 8080, b"late") == b"late"
    wait_for(lambda: admin_get(netns, 9753, "/readyz")[0] == 200, what="ready")
    assert proxy.stop() == 0


def test_create_interface_with_a_vip_and_remove_it_on_exit(netns: nsutil.NetNamespace) -> None:
    # Without a dummy driver the daemon falls back to a port-less bridge: same behaviour.
    start_backend(netns)
    proxy = netns.portproxy("run", "--create-interface", "nodelocal0",
                            "--address", "169.254.20.10/32",
                            "-f", f"tcp://nodelocal0:5353=127.0.0.1:{BACKEND_PORT}",
                            "--admin-address", "none")
    netns.wait_tcp("169.254.20.10", 5353)
    assert netns.tcp_exchange("169.254.20.10", 5353, b"vip") == b"vip"
    links = json.loads(netns.ip("-j", "link", "show"))
    assert "nodelocal0" in {link["ifname"] for link in links}
    assert proxy.stop() == 0
    links = json.loads(netns.ip("-j", "link", "show"))
    assert "nodelocal0" not in {link["ifname"] for link in links}


def nsutil_python() -> list[str]:
    import sys

    return [sys.executable]


def test_freebind_listens_on_an_address_before_it_exists(veth: Veth) -> None:
    ns = veth.ns
    start_backend(ns)
    done = ns.run([*nsutil_python(), "-m", "portproxy", "run", "-f",
                   f"tcp://10.97.0.1:8080=127.0.0.1:{BACKEND_PORT}", "--admin-address", "none"],
                  check=False)
    assert done.returncode == 3 and "not an address of this host" in done.stderr
    proxy = ns.portproxy("run", "-f", f"tcp://10.97.0.1:8080=127.0.0.1:{BACKEND_PORT},freebind",
                         "--admin-address", "none")
    ns.ip("addr", "add", "10.97.0.1/24", "dev", veth.left)
    ns.wait_tcp("10.97.0.1", 8080)
    assert ns.tcp_exchange("10.97.0.1", 8080, b"freebind") == b"freebind"
    assert proxy.stop() == 0
