"""No ephemeral port left for the connection to a backend: a local limit, said as one.

The namespace's ``net.ipv4.ip_local_port_range`` is narrowed to two ports, so the forwarder
runs out of local ports after two backend connections (TCP: per destination) or two flows
(UDP). Clients bind explicit ports outside that range, so only the forwarder runs short.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.netns import nsutil

PORT_RANGE = "40000 40001"


@pytest.fixture(autouse=True)
def _sysctl_available() -> None:
    if shutil.which("sysctl") is None:
        pytest.skip("sysctl (procps) is not installed")

TCP_BACKEND = """
import socket, threading
server = socket.create_server(("127.0.0.1", 9000))
print("ready", flush=True)

def serve(conn):
    with conn:
        while data := conn.recv(4096):
            if data == b"bye":
                return  # the backend closes first: no TIME_WAIT on the forwarder's port
            conn.sendall(data)

while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

TCP_CLIENTS = """
import json, socket, time

def connect(source_port):
    deadline = time.monotonic() + 10  # the forwarder may still be starting
    while True:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", source_port))
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", 8000))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # poll interval, bounded by the deadline

def echo(sock, payload):
    try:
        sock.sendall(payload)
        return sock.recv(4096).decode()
    except ConnectionResetError:
        return "reset"

def once(source_port, payload):
    # A reset may come before connect() returns: the forwarder resets at once.
    try:
        sock = connect(source_port)
    except ConnectionResetError:
        return "reset"
    with sock:
        return echo(sock, payload)

held = [connect(30001), connect(30002)]
results = [echo(sock, b"one") for sock in held]
results.append(once(30003, b"two"))
# The backend ends one held connection: its local port is free again (no TIME_WAIT).
held[0].sendall(b"bye")
results.append(held[0].recv(4096).decode() or "closed")
held[0].close()  # the forwarder then ends its backend socket (no TIME_WAIT: it closed second)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:  # the forwarder closes its side once it sees the end
    answer = once(30004, b"three")
    if answer != "reset":
        break
    time.sleep(0.05)  # poll interval, bounded by the deadline
results.append(answer)
print(json.dumps(results))
"""


def test_tcp_out_of_local_ports_resets_the_client_and_says_why(
        netns: nsutil.NetNamespace) -> None:
    netns.run(["sysctl", "-w", f"net.ipv4.ip_local_port_range={PORT_RANGE}"])
    backend = netns.popen_python(TCP_BACKEND)
    backend.expect_line(lambda line: line == "ready")
    proxy = netns.portproxy("run", "-f", "8000=127.0.0.1:9000", "--admin-address", "none")
    results = json.loads(netns.run_python(TCP_CLIENTS, timeout=60).stdout)
    assert results == ["one", "one", "reset", "closed", "three"]
    proxy.stop()
    logs = proxy.stderr_text()
    lines = [line for line in logs.splitlines() if "no free local port" in line]
    assert lines and "127.0.0.1:9000" in lines[0] and "ip_local_port_range" in lines[0], logs
    # The cause is local: said as such, not as "backend ... failed for client".
    assert "failed for client" not in logs


UDP_CLIENTS = """
import json, socket, time

def ask(source_port, payload, attempts):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", source_port))
    sock.settimeout(0.5)
    try:
        for _ in range(attempts):  # the first ones may reach a forwarder still starting
            sock.sendto(payload, ("127.0.0.1", 5300))
            try:
                return sock.recv(2048).decode()
            except socket.timeout:
                continue
        return "no answer"
    finally:
        sock.close()

def metrics(source_port):
    request = socket.socket()
    request.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    request.bind(("127.0.0.1", source_port))
    request.settimeout(5)
    request.connect(("127.0.0.1", 9100))
    request.sendall(b"GET /metrics HTTP/1.0\\r\\n\\r\\n")
    text = b""
    while chunk := request.recv(65536):
        text += chunk
    request.close()
    return text.decode()

def overload(text):
    return [line for line in text.splitlines()
            if line.startswith("portproxy_udp_dropped_total{") and 'reason="overload"' in line]

answers = [ask(30001, b"a", 20), ask(30002, b"b", 20), ask(30003, b"c", 1)]
deadline = time.monotonic() + 10  # the drop is counted when the forwarder reads "c"
for source_port in range(30010, 30210):
    text = metrics(source_port)
    drops = overload(text)
    if (drops and not drops[0].endswith(" 0")) or time.monotonic() > deadline:
        break
    time.sleep(0.05)  # poll interval, bounded by the deadline
print(json.dumps({"answers": answers, "metrics": text}))
"""


def test_udp_out_of_local_ports_counts_an_overload_drop(netns: nsutil.NetNamespace) -> None:
    netns.run(["sysctl", "-w", f"net.ipv4.ip_local_port_range={PORT_RANGE}"])
    backend = netns.popen_python(nsutil.UDP_REPLY_BACKEND)
    backend.expect_line(lambda line: line == "ready")
    proxy = netns.portproxy("run", "-f", "udp://127.0.0.1:5300=127.0.0.1:9000",
                            "--admin-address", "127.0.0.1:9100")
    result = json.loads(netns.run_python(UDP_CLIENTS, timeout=60).stdout)
    assert result["answers"] == ["re:a", "re:b", "no answer"]
    drops = [line for line in result["metrics"].splitlines()
             if line.startswith("portproxy_udp_dropped_total{") and 'reason="overload"' in line]
    assert len(drops) == 1 and drops[0].endswith(" 1"), result["metrics"]
    proxy.stop()
    logs = proxy.stderr_text()
    lines = [line for line in logs.splitlines() if "no socket for a new flow" in line]
    assert lines and "ip_local_port_range" in lines[0], logs


CONNECT_FIRST = """
from portproxy.endpoints import Endpoint
from portproxy.udp_flow import connect_first
sock, endpoint = connect_first([Endpoint("2001:db8::1", 53), Endpoint("127.0.0.1", 53)])
sock.close()
print(endpoint)
"""


def test_udp_no_source_address_of_a_family_tries_the_next_endpoint(
        netns: nsutil.NetNamespace) -> None:
    # No IPv6 address here: connect() to an IPv6 endpoint fails with EADDRNOTAVAIL. That
    # concerns the endpoint's family, not the local ports: the IPv4 endpoint must be used.
    netns.run(["sysctl", "-w", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.lo.disable_ipv6=1"])
    assert netns.run_python(CONNECT_FIRST).stdout.strip() == "127.0.0.1:53"
