"""Listening on an interface name, following its addresses; node-local VIP interfaces.

Each test owns a fresh network namespace (root); the daemon, the backend and the clients
all run inside it, so the addresses used here exist nowhere else.
"""

from __future__ import annotations

import json
import signal
from functools import partial

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


def serving_on_veth(veth: Veth) -> nsutil.NsProcess:
    """A backend, and portproxy on the IPv4 addresses of ``veth.left`` (10.99.0.1 to begin
    with), port 8080, admin on 127.0.0.1:9753; returns once it serves."""
    ns = veth.ns
    start_backend(ns)
    ns.ip("addr", "add", "10.99.0.1/24", "dev", veth.left)
    proxy = ns.portproxy("run", "-f", f"tcp://{veth.left}/ipv4:8080=127.0.0.1:{BACKEND_PORT}",
                         "--admin-address", "127.0.0.1:9753")
    ns.wait_tcp("10.99.0.1", 8080)
    return proxy


def test_listens_on_interface_addresses_and_follows_changes(veth: Veth) -> None:
    ns = veth.ns
    proxy = serving_on_veth(veth)
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


def link_names(ns: nsutil.NetNamespace) -> set[str]:
    return {link["ifname"] for link in json.loads(ns.ip("-j", "link", "show"))}


def test_create_interface_works_with_workers(netns: nsutil.NetNamespace) -> None:
    # The supervisor creates the link before the workers listen on it, and removes it
    # after they have exited.
    start_backend(netns)
    proxy = netns.portproxy("run", "--workers", "2", "--create-interface", "nodelocal0",
                            "--address", "169.254.20.10/32",
                            "-f", f"tcp://nodelocal0:5353=127.0.0.1:{BACKEND_PORT}",
                            "--admin-address", "none")
    netns.wait_tcp("169.254.20.10", 5353)
    for i in range(4):
        assert netns.tcp_exchange("169.254.20.10", 5353, b"vip %d" % i) == b"vip %d" % i
    assert proxy.stop() == 0, proxy.stderr_text()
    assert "nodelocal0" not in link_names(netns)


def test_a_surge_rollout_hands_the_created_interface_to_the_new_instance(
        netns: nsutil.NetNamespace) -> None:
    # maxSurge: the new instance starts beside the old one and adopts its link (on this
    # kernel maybe the port-less bridge that stands in for a dummy); the old one, stopped
    # last, must leave the link to it, then the new one serves alone.
    start_backend(netns)
    args = ("run", "--create-interface", "nodelocal0", "--address", "169.254.20.10/32",
            "-f", f"tcp://nodelocal0:5353=127.0.0.1:{BACKEND_PORT}", "--admin-address", "none")
    old = netns.portproxy(*args)
    netns.wait_tcp("169.254.20.10", 5353)
    new = netns.portproxy(*args)
    wait_for(lambda: "interface nodelocal0 adopted" in new.stderr_text()
             or new.proc.poll() is not None, what="the new instance to adopt the link")
    assert new.proc.poll() is None, new.stderr_text()
    wait_for(lambda: "listening on tcp 169.254.20.10:5353" in new.stderr_text(),
             what="the new instance to listen")
    assert old.stop() == 0
    assert "interface nodelocal0 left in place" in old.stderr_text()
    assert "nodelocal0" in link_names(netns)
    assert netns.tcp_exchange("169.254.20.10", 5353, b"after") == b"after"
    # The link carries portproxy's alias: the adopter, stopped last, removes it.
    assert new.stop() == 0
    assert "nodelocal0" not in link_names(netns)


def listening_or_gone(proc: nsutil.NsProcess, where: str) -> bool:
    return f"listening on {where}" in proc.stderr_text() or proc.proc.poll() is not None


def test_instances_listening_everywhere_keep_the_link_while_either_runs(
        netns: nsutil.NetNamespace) -> None:
    # Forwards on '*' use the VIP too, though no socket is bound to it: whichever of the
    # two instances stops first (the old one, or a surge pod rolled back) leaves the link.
    start_backend(netns)
    args = ("run", "--create-interface", "nodelocal0", "--address", "169.254.20.10/32",
            "-f", f"tcp://:5353=127.0.0.1:{BACKEND_PORT}", "--admin-address", "none")
    for first_to_stop in ("creator", "adopter"):
        creator = netns.portproxy(*args)
        netns.wait_tcp("169.254.20.10", 5353)
        adopter = netns.portproxy(*args)
        wait_for(partial(listening_or_gone, adopter, "tcp *:5353"),
                 what="the second instance to listen")
        stopping, staying = (creator, adopter) if first_to_stop == "creator" else \
            (adopter, creator)
        assert stopping.stop() == 0
        assert "interface nodelocal0 left in place" in stopping.stderr_text(), first_to_stop
        assert netns.tcp_exchange("169.254.20.10", 5353, b"kept") == b"kept"
        assert staying.stop() == 0
        assert "nodelocal0" not in link_names(netns), first_to_stop


def test_a_bridge_with_ports_is_not_adopted(netns: nsutil.NetNamespace) -> None:
    netns.ip("link", "add", "nodelocal0", "type", "bridge")
    netns.ip("link", "add", "ppxport", "type", "veth", "peer", "name", "ppxpeer")
    netns.ip("link", "set", "ppxport", "master", "nodelocal0")
    done = netns.run([*nsutil_python(), "-m", "portproxy", "run", "--create-interface",
                      "nodelocal0", "--address", "169.254.20.10/32", "-f",
                      f"tcp://nodelocal0:5353=127.0.0.1:{BACKEND_PORT}",
                      "--admin-address", "none"], check=False)
    assert done.returncode == 3
    assert "refusing to adopt it" in done.stderr
    assert "nodelocal0" in link_names(netns)  # someone else's: left alone


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


HOLDER = """
import signal, socket
holder = socket.socket()
holder.setsockopt(socket.IPPROTO_IP, 15, 1)  # IP_FREEBIND: the address is added later
holder.bind(("10.99.2.3", 8080))
holder.listen()
print("holding", flush=True)
signal.pause()  # until the test stops us
"""


def test_an_address_whose_port_is_held_is_retried_until_it_can_be_listened_on(
        veth: Veth) -> None:
    # The watcher reports only changes: without a retry, an address that failed to bind
    # stayed unserved until something else on the interface changed, and /readyz said 200.
    ns = veth.ns
    proxy = serving_on_veth(veth)
    holder = ns.popen_python(HOLDER)
    holder.expect_line(lambda line: line == "holding")
    ns.ip("addr", "add", "10.99.2.3/24", "dev", veth.left)
    wait_for(lambda: "10.99.2.3:8080 is already in use" in proxy.stderr_text(),
             what="the bind error")
    status, body = admin_get(ns, 9753, "/readyz")
    assert status == 503 and "tcp 10.99.2.3:8080 is already in use" in body
    assert "(retrying)" in body
    assert holder.stop() != 0  # the other program goes; nothing changes on the interface

    def served() -> bool:
        try:
            return ns.tcp_exchange("10.99.2.3", 8080, b"retried", timeout=2) == b"retried"
        except AssertionError:  # refused until the retry binds it
            return False
    wait_for(served, what="the retried listener to serve")
    wait_for(lambda: admin_get(ns, 9753, "/readyz")[0] == 200, what="ready again")
    assert proxy.stderr_text().count("10.99.2.3:8080 is already in use") == 1  # not per try
    assert proxy.stop() == 0


STALE_READ = """
import asyncio, json, logging, socket, sys
from portproxy.errors import SetupError
from portproxy.ifbind import InterfaceBinding
from portproxy.sockets import BindRequest, bind_socket
from portproxy.spec import ListenAddress

logging.basicConfig(stream=sys.stderr, level=logging.INFO)

class SocketEngine:  # real binds, nothing else
    def __init__(self):
        self.socks = {}
    def add_listener(self, host, freebind=False):
        self.socks[host] = bind_socket(BindRequest(host, 8080), "f")
    def remove_listener(self, host):
        sock = self.socks.pop(host, None)
        if sock is not None:
            sock.close()

engine, details = SocketEngine(), []
binding = InterfaceBinding("f", ListenAddress("interface", sys.argv[1], 8080), [engine],
                           wait=False, on_detail=details.append)
# The start-up read listed 10.99.0.1 and 10.99.0.9; 10.99.0.9 left before its bind.
try:
    binding._converge({"10.99.0.1", "10.99.0.9"}, True, strict=True)
    outcome = "started"
except SetupError as exc:
    outcome = str(exc)
print(json.dumps({"outcome": outcome, "bound": sorted(engine.socks),
                  "detail": details[-1] if details else None}))
"""


def test_an_address_gone_between_the_read_and_the_bind_does_not_fail_the_start(
        veth: Veth) -> None:
    ns = veth.ns
    ns.ip("addr", "add", "10.99.0.1/24", "dev", veth.left)
    done = ns.run_python(STALE_READ.replace("sys.argv[1]", repr(veth.left)))
    assert json.loads(done.stdout) == {"outcome": "started", "bound": ["10.99.0.1"],
                                       "detail": ""}
    assert f"10.99.0.9 left {veth.left} before it could be listened on" in done.stderr


def test_check_accepts_a_forward_on_the_interface_run_would_create(
        netns: nsutil.NetNamespace) -> None:
    done = netns.run([*nsutil_python(), "-m", "portproxy", "check", "--offline",
                      "--create-interface", "nodelocal0", "--address", "169.254.20.10/32",
                      "-f", f"tcp://nodelocal0:5353=127.0.0.1:{BACKEND_PORT}"], check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[1].endswith("ok")
    links = json.loads(netns.ip("-j", "link", "show"))
    assert "nodelocal0" not in {link["ifname"] for link in links}  # check creates nothing
    # Another interface that is missing is still reported, as run would fail on it.
    done = netns.run([*nsutil_python(), "-m", "portproxy", "check", "--offline",
                      "--create-interface", "nodelocal0", "--address", "169.254.20.10/32",
                      "-f", f"tcp://other0:5353=127.0.0.1:{BACKEND_PORT}"], check=False)
    assert done.returncode == 3 and "interface other0 does not exist" in done.stdout


def test_an_interface_address_that_is_the_static_target_is_refused(veth: Veth) -> None:
    # Listening there would send every client back into the forward, until no descriptor
    # is left; a literal listen address equal to the target is already exit 2.
    ns = veth.ns
    ns.ip("addr", "add", "10.99.0.1/24", "dev", veth.left)
    done = ns.run([*nsutil_python(), "-m", "portproxy", "run", "-f",
                   f"tcp://{veth.left}:5300=10.99.0.1:5300", "--admin-address", "none"],
                  check=False)
    assert done.returncode == 3
    assert "10.99.0.1 of " + veth.left + " is the forward's own target" in done.stderr
    # Added later, the address is not listened on; the others are.
    start_backend(ns)
    proxy = ns.portproxy("run", "-f", f"tcp://{veth.left}:{BACKEND_PORT + 1}=10.99.1.1:"
                         f"{BACKEND_PORT + 1},wait-interface", "--admin-address", "127.0.0.1:9753")
    ns.wait_tcp("10.99.0.1", BACKEND_PORT + 1)
    ns.ip("addr", "add", "10.99.1.1/24", "dev", veth.left)
    wait_for(lambda: "is the forward's own target" in proxy.stderr_text(), what="the refusal")
    status, body = admin_get(ns, 9753, "/readyz")
    assert status == 503 and "own target" in body
    assert proxy.stop() == 0


def test_sigterm_while_the_workers_start_stops_cleanly(netns: nsutil.NetNamespace) -> None:
    # The workers take about a second to start; a signal meanwhile used to meet the
    # default action (exit 143), leaving the created link behind.
    proxy = netns.portproxy("run", "--workers", "2", "--create-interface", "nodelocal0",
                            "--address", "169.254.20.10/32", "-f",
                            f"tcp://nodelocal0:5353=127.0.0.1:{BACKEND_PORT}",
                            "--admin-address", "none")
    wait_for(lambda: "nodelocal0" in link_names(netns), interval=0.001, what="the link")
    assert "running (pid" not in proxy.stderr_text()  # still starting
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(timeout=20) == 0, proxy.stderr_text()
    assert "nodelocal0" not in link_names(netns)
