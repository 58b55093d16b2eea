"""UDP with proxy-protocol=v2: a DGRAM header in front of every datagram to the backend."""

from __future__ import annotations

import os
from typing import Any

import pytest

from portproxy.proxyproto import decode_v2
from portproxy.spec import ProxyProtocol
from tests.net.udp_harness import ProxyOn, UdpBackend, client, ipv6_loopback_available


def describe_header(data: bytes, source: tuple[Any, ...]) -> list[bytes]:
    """The test backend: parse the header of each datagram, answer what it said + payload."""
    header = decode_v2(data)
    payload = data[header.header_len:]
    facts = f"{header.command} {header.family} {header.transport} {header.src} {header.dst}"
    return [facts.encode() + b"|" + payload]


def test_every_datagram_carries_the_client_and_the_address_it_sent_to(proxy_on: ProxyOn) -> None:
    with UdpBackend(handler=describe_header) as backend, \
            proxy_on([backend.endpoint], listen_host="",
                     proxy_protocol=ProxyProtocol.V2) as proxy, \
            client("127.0.0.2") as sock:
        port = sock.getsockname()[1]
        replies = []
        for local, payload in (("127.0.0.3", b"first"), ("127.0.0.3", b"second"),
                               ("127.0.0.1", b"third")):
            sock.sendto(payload, (local, proxy.port))
            replies.append(sock.recvfrom(4096)[0])
        assert proxy.flows == 1
    expected = [
        f"proxy 1 dgram ('127.0.0.2', {port}) ('127.0.0.3', {proxy.port})|first",
        f"proxy 1 dgram ('127.0.0.2', {port}) ('127.0.0.3', {proxy.port})|second",
        f"proxy 1 dgram ('127.0.0.2', {port}) ('127.0.0.1', {proxy.port})|third",
    ]
    # Replies reach the client exactly as the backend sent them: no header added or removed.
    assert [r.decode() for r in replies] == expected
    assert len(backend.received) == 3


def test_large_payload_behind_the_header_is_intact(proxy_on: ProxyOn) -> None:
    payload = os.urandom(65507 - 28)  # the largest that fits with the 28-byte IPv4 header
    with UdpBackend(handler=lambda data, _: [data[decode_v2(data).header_len:]]) as backend, \
            proxy_on([backend.endpoint], proxy_protocol=ProxyProtocol.V2) as proxy, \
            client() as sock:
        sock.sendto(payload, ("127.0.0.1", proxy.port))
        assert sock.recvfrom(70000)[0] == payload
    assert len(backend.received[0][0]) == 65507


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_ipv6_client_gets_an_ipv6_header(proxy_on: ProxyOn) -> None:
    with UdpBackend(handler=describe_header) as backend, \
            proxy_on([backend.endpoint], listen_host="",
                     proxy_protocol=ProxyProtocol.V2) as proxy, \
            client("::1") as sock:
        sock.sendto(b"six", ("::1", proxy.port))
        reply = sock.recvfrom(4096)[0].decode()
        port = sock.getsockname()[1]
    assert reply == f"proxy 2 dgram ('::1', {port}) ('::1', {proxy.port})|six"


def test_without_the_option_datagrams_go_unchanged(proxy_on: ProxyOn) -> None:
    with UdpBackend() as backend, proxy_on([backend.endpoint]) as proxy, client() as sock:
        sock.sendto(b"\r\n\r\n\x00\r\nQUIT\n looks like a header", ("127.0.0.1", proxy.port))
        assert sock.recvfrom(4096)[0] == b"\r\n\r\n\x00\r\nQUIT\n looks like a header"
    assert backend.received[0][0] == b"\r\n\r\n\x00\r\nQUIT\n looks like a header"
