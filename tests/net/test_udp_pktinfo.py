"""Decoding PKTINFO ancillary data into the local address and the reply's ancillary data."""

from __future__ import annotations

import socket
import sys

from portproxy.udp_pktinfo import (
    IP_PKTINFO,
    IPV6_PKTINFO,
    SO_RXQ_OVFL,
    kernel_drops,
    local_address,
    needs_pktinfo,
    pktinfo_of,
)


def in_pktinfo(ifindex: int, spec_dst: str, addr: str) -> bytes:
    return (ifindex.to_bytes(4, "little") + socket.inet_pton(socket.AF_INET, spec_dst)
            + socket.inet_pton(socket.AF_INET, addr))


def in6_pktinfo(addr: str, ifindex: int) -> bytes:
    return socket.inet_pton(socket.AF_INET6, addr) + ifindex.to_bytes(4, "little")


def test_ipv4_reply_uses_spec_dst_without_interface() -> None:
    raw = in_pktinfo(7, "192.0.2.10", "192.0.2.255")  # a broadcast answered from .10
    local = local_address([(socket.IPPROTO_IP, IP_PKTINFO, raw)], socket.socket())
    assert local.host == "192.0.2.255"
    assert local.raw == raw
    assert local.reply == ((socket.IPPROTO_IP, IP_PKTINFO,
                            bytes(4) + socket.inet_aton("192.0.2.10") + bytes(4)),)


def test_ipv6_global_address_drops_the_interface() -> None:
    raw = in6_pktinfo("2001:db8::1", 3)
    local = local_address([(socket.IPPROTO_IPV6, IPV6_PKTINFO, raw)], socket.socket())
    assert local.host == "2001:db8::1"
    assert local.reply == ((socket.IPPROTO_IPV6, IPV6_PKTINFO, raw[:16] + bytes(4)),)


def test_ipv6_link_local_keeps_the_interface() -> None:
    raw = in6_pktinfo("fe80::1", 3)
    local = local_address([(socket.IPPROTO_IPV6, IPV6_PKTINFO, raw)], socket.socket())
    assert local.reply == ((socket.IPPROTO_IPV6, IPV6_PKTINFO, raw),)


def test_ipv4_mapped_destination_of_a_dual_stack_socket() -> None:
    raw = in6_pktinfo("::ffff:127.0.0.2", 1)
    local = local_address([(socket.IPPROTO_IPV6, IPV6_PKTINFO, raw)], socket.socket())
    assert local.host == "::ffff:127.0.0.2"
    assert local.reply == ((socket.IPPROTO_IPV6, IPV6_PKTINFO, raw[:16] + bytes(4)),)


def test_an_ipv4_datagram_on_a_dual_stack_socket_answers_from_spec_dst() -> None:
    """Such a socket gets IPV6_PKTINFO (mapped header destination) and then IP_PKTINFO: the
    latter wins, since for a broadcast only its spec_dst is a valid source."""
    v6 = in6_pktinfo("::ffff:10.88.0.255", 1)
    v4 = in_pktinfo(1, "10.88.0.1", "10.88.0.255")
    ancdata = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, v6), (socket.IPPROTO_IP, IP_PKTINFO, v4)]
    assert pktinfo_of(ancdata) == v4
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        local = local_address(ancdata, sock)
    assert local.host == "::ffff:10.88.0.255"  # the client's family
    assert local.reply == ((socket.IPPROTO_IP, IP_PKTINFO,
                            bytes(4) + socket.inet_aton("10.88.0.1") + bytes(4)),)


def test_multicast_destination_replies_without_pktinfo() -> None:
    raw = in6_pktinfo("ff02::fb", 2)
    local = local_address([(socket.IPPROTO_IPV6, IPV6_PKTINFO, raw)], socket.socket())
    assert local.reply == ()


def test_without_pktinfo_the_bound_address_is_used() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.3", 0))
        local = local_address([], sock)
    assert (local.host, local.raw, local.reply) == ("127.0.0.3", b"", ())


def test_pktinfo_of_skips_other_ancillary_data() -> None:
    raw = in_pktinfo(1, "127.0.0.1", "127.0.0.1")
    other = (socket.IPPROTO_IP, socket.IP_TTL, (64).to_bytes(4, "little"))
    assert pktinfo_of([other, (socket.IPPROTO_IP, IP_PKTINFO, raw)]) == raw
    assert pktinfo_of([other]) == b""


def test_kernel_drop_count() -> None:
    count = (socket.SOL_SOCKET, SO_RXQ_OVFL, (1234).to_bytes(4, sys.byteorder))
    raw = in_pktinfo(1, "127.0.0.1", "127.0.0.1")
    assert kernel_drops([count, (socket.IPPROTO_IP, IP_PKTINFO, raw)]) == 1234
    assert kernel_drops([(socket.IPPROTO_IP, IP_PKTINFO, raw)]) == -1


def test_only_wildcard_multicast_and_broadcast_listeners_need_pktinfo() -> None:
    def bound(family: socket.AddressFamily, host: str) -> bool:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((host, 0))
            return needs_pktinfo(sock)

    assert bound(socket.AF_INET, "0.0.0.0")
    assert bound(socket.AF_INET6, "::")
    assert not bound(socket.AF_INET, "127.0.0.2")
    assert not bound(socket.AF_INET6, "::1")
    assert bound(socket.AF_INET, "224.0.0.251")
