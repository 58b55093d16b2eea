"""The pure parts of portproxy.netlink: no namespace, no root.

(They live beside the namespace tests because they test the same module.)
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest

from portproxy import netlink as nl
from portproxy import netlink_events as events
from portproxy.errors import ConfigError
from portproxy.spec_values import check_interface_name

RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE = 16, 17, 20, 21, 24


def message(kind: int, index: int, attrs: bytes = b"") -> bytes:
    """One rtnetlink message as the kernel sends it: header, 8-byte prefix of the
    ifinfomsg/ifaddrmsg body with the index at offset 4, then attributes, padded to 4."""
    body = struct.pack("=BBBBi", socket.AF_INET, 32, 0, 0, index) + attrs
    length = 16 + len(body)
    padding = b"\0" * (-length % 4)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + body + padding


@pytest.mark.parametrize("kind", [RTM_NEWADDR, RTM_DELADDR, RTM_NEWLINK, RTM_DELLINK])
def test_events_of_the_watched_index_are_relevant(kind: int) -> None:
    assert events.relevant(message(kind, 7), 7)
    assert not events.relevant(message(kind, 8), 7)


def test_while_the_interface_is_missing_any_link_event_is_relevant() -> None:
    assert events.relevant(message(RTM_NEWLINK, 12), None)
    assert events.relevant(message(RTM_DELLINK, 12), None)
    assert not events.relevant(message(RTM_NEWADDR, 12), None)


def test_a_relevant_message_after_irrelevant_ones_in_one_buffer_is_found() -> None:
    odd = message(RTM_NEWADDR, 3, attrs=b"\x05\x00\x01\x00\x01")  # 5-byte attr, padded
    assert len(odd) % 4 == 0
    buffer = odd + message(RTM_NEWLINK, 4) + message(RTM_DELADDR, 7)
    assert events.relevant(buffer, 7)
    assert not events.relevant(odd + message(RTM_NEWLINK, 4), 7)


def test_unexpected_or_truncated_messages_count_as_relevant() -> None:
    assert events.relevant(message(RTM_NEWROUTE, 99), 7)
    assert events.relevant(message(RTM_NEWADDR, 7)[:20], 3)
    assert not events.relevant(b"", 7)


@pytest.mark.parametrize(
    ("family", "address", "flags", "wanted", "expected"),
    [
        (socket.AF_INET, "10.0.0.1", 0, "any", "10.0.0.1"),
        (socket.AF_INET, "169.254.20.10", 0, "any", "169.254.20.10"),
        (socket.AF_INET, "10.0.0.1", 0, "ipv6", None),
        (socket.AF_INET6, "FD00:0::1", 0, "any", "fd00::1"),
        (socket.AF_INET6, "fd00::1", 0, "ipv4", None),
        (socket.AF_INET6, "fe80::1", 0x80, "any", None),
        (socket.AF_INET6, "febf::1", 0, "ipv6", None),
        (socket.AF_INET6, "fec0::1", 0, "ipv6", "fec0::1"),
        (socket.AF_INET6, "fd00::1", 0x40, "any", None),  # tentative
        (socket.AF_INET6, "fd00::1", 0x48, "any", None),  # DAD failed
        (socket.AF_INET6, "fd00::1", 0x20 | 0x80, "any", "fd00::1"),  # deprecated, permanent
        (socket.AF_INET, None, 0, "any", None),
    ],
)
def test_usable_addresses(
    family: int, address: str | None, flags: int, wanted: nl.Family, expected: str | None
) -> None:
    assert nl._usable_address(family, address, flags, wanted) == expected


def test_addresses_sort_ipv4_first_numerically() -> None:
    addresses = frozenset({"fd00::2", "10.0.0.10", "fd00::1", "9.0.0.1", "10.0.0.9"})
    assert nl._sort_addresses(addresses) == [
        "9.0.0.1",
        "10.0.0.9",
        "10.0.0.10",
        "fd00::1",
        "fd00::2",
    ]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "eth0:1", "has space", "x" * 16])
def test_names_the_kernel_would_refuse_are_config_errors(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid interface name"):
        check_interface_name(name)


@pytest.mark.parametrize("name", ["eth0", "x" * 15, "nodelocaldns", "br-1.100"])
def test_valid_names_pass(name: str) -> None:
    check_interface_name(name)


def test_cidrs_are_normalised_deduplicated_and_default_to_host_routes() -> None:
    parsed = nl._parse_cidrs(["169.254.20.10", "fd00:0::a", "10.0.0.1/24", "169.254.20.10/32"])
    assert [p.with_prefixlen for p in parsed] == [
        "169.254.20.10/32",
        "fd00::a/128",
        "10.0.0.1/24",
    ]


@pytest.mark.parametrize("bad", ["10.0.0.300", "fd00::/129", "eth0", ""])
def test_bad_cidrs_are_config_errors_naming_them(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid interface address"):
        nl._parse_cidrs(["10.0.0.1", bad])


def test_setup_errors_are_one_line_and_say_why() -> None:
    eperm = nl._setup_error("vip0", "create", OSError(errno.EPERM, "denied"), "dummy")
    assert str(eperm) == (
        "cannot create interface 'vip0': operation not permitted (needs the NET_ADMIN capability)"
    )
    nodriver = nl._setup_error("vip0", "create", OSError(errno.EOPNOTSUPP, "no"), "dummy")
    assert "'dummy'" in str(nodriver) and "driver" in str(nodriver)
    assert isinstance(nodriver, nl.NoLinkDriver)
    assert not isinstance(eperm, nl.NoLinkDriver)
    other = nl._setup_error("vip0", "remove", OSError(errno.EBUSY, "busy"))
    assert str(other) == f"cannot remove interface 'vip0': {os.strerror(errno.EBUSY)}"
    for error in (eperm, nodriver, other):
        assert "\n" not in str(error)


def test_created_interface_lists_addresses_to_listen_on() -> None:
    created = nl.CreatedInterface(
        "vip0", 5, "dummy", False, ("169.254.20.10/32", "fd00::a/128"), ("fd00::a/128",)
    )
    assert created.addresses == ("169.254.20.10", "fd00::a")
