"""UDP to a broadcast address: the reply leaves from the local unicast address (spec_dst).

A client that broadcasts a query (a discovery protocol, a DHCP-style exchange) expects the
answer from a unicast address of the host; a broadcast address is no valid source at all.
The default listener is dual-stack (``[::]``), where IPv4 datagrams arrive mapped: it must
answer them as the IPv4 wildcard listener does.
"""

from __future__ import annotations

import json

import pytest

from tests.netns import nsutil

CLIENT = """
import json, socket, time
answers = {}
for destination in ("10.88.0.1", "10.88.0.255"):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.settimeout(0.5)
    deadline = time.monotonic() + 10  # the proxy may still be starting: retry until then
    while time.monotonic() < deadline:
        sock.sendto(destination.encode(), (destination, 5300))
        try:
            data, source = sock.recvfrom(2048)
        except socket.timeout:
            continue
        answers[destination] = [data.decode(), source[0]]
        break
    sock.close()
print(json.dumps(answers))
"""


@pytest.mark.parametrize("listen", ["", "0.0.0.0:"], ids=["dual-stack", "ipv4"])
def test_a_broadcast_query_is_answered_from_the_unicast_address(
        netns: nsutil.NetNamespace, listen: str) -> None:
    netns.ip("addr", "add", "10.88.0.1/24", "brd", "10.88.0.255", "dev", "lo")
    backend = netns.popen_python(nsutil.UDP_REPLY_BACKEND)
    backend.expect_line(lambda line: line == "ready")
    netns.portproxy("run", "-f", f"udp://{listen}5300=127.0.0.1:9000", "--admin-address",
                    "none")
    answers = json.loads(netns.run_python(CLIENT).stdout)
    assert answers == {"10.88.0.1": ["re:10.88.0.1", "10.88.0.1"],
                       "10.88.0.255": ["re:10.88.0.255", "10.88.0.1"]}
