"""A link-local IPv6 endpoint keeps its scope: without the interface it cannot be reached."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import wait_for
from tests.netns import nsutil
from tests.netns.conftest import Veth

PROBE = """
import asyncio, json, socket
from portproxy.resolve.dns import system_lookup

server = socket.socket(socket.AF_INET6)
server.bind(({address!r}, 0, 0, socket.if_nametoindex({ifname!r})))
server.listen()
port = server.getsockname()[1]
[found] = asyncio.run(system_lookup({address!r} + "%" + {ifname!r}))
client = socket.create_connection((found, port), timeout=5)
conn, _ = server.accept()
client.sendall(b"scoped")
print(json.dumps({{"found": found, "got": conn.recv(6).decode()}}))
"""


def link_local(ns: nsutil.NetNamespace, ifname: str) -> str | None:
    entries: list[dict[str, Any]] = ns.addresses(ifname)
    for entry in entries:
        if entry.get("scope") == "link" and entry.get("family") == "inet6" \
                and not entry.get("tentative"):
            return str(entry["local"])
    return None


def test_a_link_local_address_is_resolved_with_its_scope(veth: Veth) -> None:
    address = wait_for(lambda: link_local(veth.ns, veth.right), timeout=15,
                       what="a link-local address past duplicate detection")
    result = json.loads(veth.ns.run_python(PROBE.format(address=address,
                                                        ifname=veth.right)).stdout)
    assert result["got"] == "scoped"
    assert result["found"].startswith(address + "%")
