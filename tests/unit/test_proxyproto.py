"""PROXY protocol encoder/decoder against the byte layouts and examples of the public spec.

Expected bytes are written out by hand from the spec's field descriptions (section 2.1 for
v1, 2.2 for v2), not produced by the code under test.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portproxy.proxyproto import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    HeaderV2,
    IncompleteHeaderError,
    ParsedV1,
    ParsedV2,
    ProxyProtocolError,
    decode_v2,
    encode_header,
    encode_v1,
    encode_v2,
    parse_v1,
    parse_v2,
)

SIG = bytes.fromhex("0D0A0D0A000D0A515549540A")


def test_signature_is_the_spec_one() -> None:
    assert V2_SIGNATURE == SIG
    assert len(SIG) == 12


# ------------------------------------------------------------------------------ v1 encode


def test_v1_tcp4_spec_example() -> None:
    assert (
        encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
        == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )


def test_v1_tcp4_brief_example() -> None:
    assert (
        encode_v1(("1.2.3.4", 1111), ("5.6.7.8", 2222))
        == b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n"
    )


def test_v1_tcp6_canonical_lowercase_compressed() -> None:
    line = encode_v1(("2001:DB8:0:0:0:0:0:1", 1111, 0, 0), ("2001:db8::2", 2222, 0, 0))
    assert line == b"PROXY TCP6 2001:db8::1 2001:db8::2 1111 2222\r\n"


def test_v1_ipv6_scope_suffix_dropped() -> None:
    line = encode_v1(("fe80::1%lo", 1, 0, 1), ("fe80::2%lo", 2, 0, 1))
    assert line == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


def test_v1_ipv4_mapped_on_both_sides_becomes_tcp4() -> None:
    line = encode_v1(("::ffff:10.0.0.1", 40000, 0, 0), ("::ffff:10.0.0.2", 53, 0, 0))
    assert line == b"PROXY TCP4 10.0.0.1 10.0.0.2 40000 53\r\n"


def test_v1_ipv4_mapped_and_plain_ipv4_becomes_tcp4() -> None:
    line = encode_v1(("::ffff:10.0.0.1", 40000), ("10.0.0.2", 53))
    assert line == b"PROXY TCP4 10.0.0.1 10.0.0.2 40000 53\r\n"


def test_v1_mapped_and_real_ipv6_stays_tcp6() -> None:
    line = encode_v1(("::ffff:10.0.0.1", 1), ("2001:db8::2", 2))
    assert line == b"PROXY TCP6 ::ffff:10.0.0.1 2001:db8::2 1 2\r\n"


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (None, ("1.2.3.4", 80)),
        (("1.2.3.4", 80), None),
        (None, None),
        (("1.2.3.4", 1), ("2001:db8::1", 2)),
        (("2001:db8::1", 1), ("1.2.3.4", 2)),
    ],
)
def test_v1_unknown(src, dst) -> None:
    assert encode_v1(src, dst) == b"PROXY UNKNOWN\r\n"


def test_v1_longest_lines_match_spec_lengths() -> None:
    tcp4 = encode_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535))
    assert tcp4 == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(tcp4) == 56
    full = ":".join(["ffff"] * 8)
    tcp6 = encode_v1((full, 65535), (full, 65535))
    assert tcp6 == f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(tcp6) == 104
    assert len(encode_v1(None, None)) == 15


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (("1.2.3.4", -1), ("5.6.7.8", 1)),
        (("1.2.3.4", 65536), ("5.6.7.8", 1)),
        (("1.2.3.4", True), ("5.6.7.8", 1)),
        (("example.com", 1), ("5.6.7.8", 1)),
        (("1.2.3", 1), ("5.6.7.8", 1)),
        (("01.2.3.4", 1), ("5.6.7.8", 1)),
    ],
)
def test_bad_addresses_are_rejected_by_both_encoders(src, dst) -> None:
    with pytest.raises(ValueError):
        encode_v1(src, dst)
    with pytest.raises(ValueError):
        encode_v2(src, dst, "stream")


# ------------------------------------------------------------------------------ v2 encode


def test_v2_tcp4_layout() -> None:
    header = encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443), "stream")
    assert header == SIG + bytes.fromhex("21 11 000C C0A80001 C0A8000B DC04 01BB")
    assert len(header) == 16 + 12


def test_v2_udp4_layout() -> None:
    header = encode_v2(("10.1.2.3", 5353), ("10.0.0.10", 53), "dgram")
    assert header == SIG + bytes.fromhex("21 12 000C 0A010203 0A00000A 14E9 0035")


def test_v2_tcp6_layout() -> None:
    header = encode_v2(("2001:db8::1", 1111, 0, 0), ("2001:db8::ff", 2222, 0, 0), "stream")
    expected = (
        SIG
        + bytes.fromhex("21 21 0024")
        + bytes.fromhex("20010DB8000000000000000000000001")
        + bytes.fromhex("20010DB80000000000000000000000FF")
        + bytes.fromhex("0457 08AE")
    )
    assert header == expected
    assert len(header) == 16 + 36


def test_v2_udp6_layout() -> None:
    header = encode_v2(("::1", 65535), ("::2", 0), "dgram")
    expected = SIG + bytes.fromhex("21 22 0024") + bytes(15) + b"\x01" + bytes(15) + b"\x02"
    assert header == expected + bytes.fromhex("FFFF 0000")


def test_v2_mapped_addresses_become_inet() -> None:
    header = encode_v2(("::ffff:127.0.0.1", 1), ("::ffff:127.0.0.2", 2), "dgram")
    assert header == SIG + bytes.fromhex("21 12 000C 7F000001 7F000002 0001 0002")


def test_v2_local_has_no_addresses() -> None:
    header = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), "stream", command="local")
    assert header == SIG + bytes.fromhex("20 00 0000")
    assert encode_v2(None, None, "dgram", command="local") == SIG + bytes.fromhex("20 00 0000")


@pytest.mark.parametrize(
    ("src", "dst"),
    [(None, ("1.2.3.4", 1)), (("1.2.3.4", 1), ("::1", 2)), (None, None)],
)
def test_v2_unknown_is_proxy_with_unspec(src, dst) -> None:
    assert encode_v2(src, dst, "stream") == SIG + bytes.fromhex("21 00 0000")


def test_v2_tlvs_follow_addresses_and_count_in_length() -> None:
    header = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), "stream", tlvs=[(0x04, b""), (0xE0, b"abc")])
    # 12 address bytes + TLV (3 + 0) + TLV (3 + 3) = 21 = 0x15
    expected = SIG + bytes.fromhex("21 11 0015 01020304 05060708 0001 0002")
    assert header == expected + bytes.fromhex("04 0000") + bytes.fromhex("E0 0003") + b"abc"


def test_v2_local_with_tlvs() -> None:
    header = encode_v2(None, None, "stream", command="local", tlvs=[(0x05, b"id")])
    assert header == SIG + bytes.fromhex("20 00 0005 05 0002") + b"id"


@pytest.mark.parametrize(
    "tlvs",
    [[(256, b"")], [(-1, b"")], [(0xE0, bytes(65536))], [(0xE0, bytes(40000))] * 2],
)
def test_v2_bad_tlvs_rejected(tlvs) -> None:
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), "stream", tlvs=tlvs)


def test_v2_bad_transport_and_command_rejected() -> None:
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), "seqpacket")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), "stream", command="health")  # type: ignore[arg-type]


def test_encode_header_dispatch() -> None:
    src, dst = ("1.2.3.4", 1), ("5.6.7.8", 2)
    assert encode_header(1, src, dst, "stream") == encode_v1(src, dst)
    assert encode_header(2, src, dst, "dgram") == encode_v2(src, dst, "dgram")
    assert encode_header("v1", src, dst, "stream") == encode_v1(src, dst)
    assert encode_header("v2", src, dst, "stream") == encode_v2(src, dst, "stream")
    with pytest.raises(ValueError):
        encode_header(1, src, dst, "dgram")
    with pytest.raises(ValueError):
        encode_header(3, src, dst, "stream")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_header("v3", src, dst, "stream")


# ------------------------------------------------------------------------------ v1 parse


def test_parse_v1_spec_example_with_payload_after() -> None:
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    parsed = parse_v1(data)
    assert parsed == ParsedV1(47, ("192.168.0.1", 56324), ("192.168.0.11", 443), "TCP4")
    assert data[parsed.header_len :] == b"GET / HTTP/1.1\r\n"


def test_parse_v1_tcp6_normalises_case() -> None:
    parsed = parse_v1(b"PROXY TCP6 2001:DB8::1 ::1 1 0\r\n")
    assert parsed.src == ("2001:db8::1", 1)
    assert parsed.dst == ("::1", 0)
    assert parsed.protocol == "TCP6"


def test_parse_v1_unknown_ignores_the_rest_of_the_line() -> None:
    assert parse_v1(b"PROXY UNKNOWN\r\n") == ParsedV1(15, None, None, "UNKNOWN")
    full = ":".join(["ffff"] * 8)
    worst = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(worst) == V1_MAX_LENGTH
    assert parse_v1(worst) == ParsedV1(107, None, None, "UNKNOWN")


def test_parse_v1_line_over_107_bytes_rejected() -> None:
    full = ":".join(["ffff"] * 8)
    too_long = f"PROXY UNKNOWN {full} {full} 65535 655350\r\n".encode()
    assert len(too_long) == V1_MAX_LENGTH + 1
    with pytest.raises(ProxyProtocolError) as info:
        parse_v1(too_long)
    assert not isinstance(info.value, IncompleteHeaderError)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # heading zero in a port
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
        b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",  # heading zero in an address
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # two spaces
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\n2\r\n",  # lone LF
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
        b"PROXY\r\n",
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
    ],
)
def test_parse_v1_rejects(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        parse_v1(line)
    assert not isinstance(info.value, IncompleteHeaderError)


@pytest.mark.parametrize("cut", [0, 1, 5, 6, 20, 46])
def test_parse_v1_incomplete(cut: int) -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    with pytest.raises(IncompleteHeaderError):
        parse_v1(line[:cut])


def test_parse_v1_incomplete_bounded_by_max_length() -> None:
    with pytest.raises(IncompleteHeaderError):
        parse_v1(b"PROXY UNKNOWN " + b"x" * 91)  # 105 bytes: CRLF may still come
    with pytest.raises(IncompleteHeaderError):
        parse_v1(b"PROXY UNKNOWN " + b"x" * 91 + b"\r")
    with pytest.raises(ProxyProtocolError) as info:
        parse_v1(b"PROXY UNKNOWN " + b"x" * 92)  # 106 bytes without CR: cannot fit
    assert not isinstance(info.value, IncompleteHeaderError)
    with pytest.raises(ProxyProtocolError) as info:
        parse_v1(b"PROXY UNKNOWN " + b"x" * 92 + b"\r")  # the LF would be byte 108
    assert not isinstance(info.value, IncompleteHeaderError)


# ------------------------------------------------------------------------------ v2 parse


def test_decode_v2_full_fields() -> None:
    data = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), "dgram", tlvs=[(0xE1, b"xy")])
    header = decode_v2(data + b"payload")
    assert header == HeaderV2(
        header_len=len(data),
        command="proxy",
        family=1,
        transport="dgram",
        src=("1.2.3.4", 1),
        dst=("5.6.7.8", 2),
        tlvs=((0xE1, b"xy"),),
    )
    assert parse_v2(data) == ParsedV2(len(data), ("1.2.3.4", 1), ("5.6.7.8", 2), "dgram")


def test_decode_v2_local_ignores_addresses_present() -> None:
    # Receivers must honour the length field even for LOCAL and ignore the addresses.
    data = SIG + bytes.fromhex("20 11 000C 01020304 05060708 0001 0002")
    header = decode_v2(data)
    assert (header.command, header.src, header.dst, header.header_len) == (
        "local",
        None,
        None,
        28,
    )


def test_decode_v2_unix_family_skipped() -> None:
    data = SIG + bytes.fromhex("21 31 00D8") + bytes(216)
    assert parse_v2(data) == ParsedV2(16 + 216, None, None, "stream")


@pytest.mark.parametrize(
    "data",
    [
        b"\r\n\r\n\x00\r\nQUIX\n" + bytes.fromhex("21 11 0000"),  # signature
        SIG + bytes.fromhex("11 11 000C") + bytes(12),  # version 1 nibble
        SIG + bytes.fromhex("22 11 000C") + bytes(12),  # unassigned command
        SIG + bytes.fromhex("21 13 000C") + bytes(12),  # unknown transport
        SIG + bytes.fromhex("21 41 000C") + bytes(12),  # unknown family
        SIG + bytes.fromhex("21 11 000B") + bytes(11),  # too short for IPv4
        SIG + bytes.fromhex("21 21 000C") + bytes(12),  # too short for IPv6
        SIG + bytes.fromhex("21 00 0002") + bytes(2),  # truncated TLV header
        SIG + bytes.fromhex("21 00 0004 E0 0002") + b"x",  # TLV value overruns
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    ],
)
def test_decode_v2_rejects(data: bytes) -> None:
    with pytest.raises(ProxyProtocolError) as info:
        decode_v2(data)
    assert not isinstance(info.value, IncompleteHeaderError)


def test_decode_v2_incomplete_at_every_cut() -> None:
    data = encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2), "stream", tlvs=[(4, b"abc")])
    for cut in range(len(data)):
        with pytest.raises(IncompleteHeaderError):
            decode_v2(data[:cut])
    assert decode_v2(data).header_len == len(data)


# ------------------------------------------------------------------------------ round trips

ports = st.integers(min_value=0, max_value=65535)
any_ip = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6))


def _expected(src_ip, dst_ip):
    """Independent model of the family normalisation, built on ``ipaddress``."""

    def as_v4(ip):
        if ip.version == 4:
            return ip
        return ip.ipv4_mapped

    if as_v4(src_ip) is not None and as_v4(dst_ip) is not None:
        return 4, str(as_v4(src_ip)), str(as_v4(dst_ip))
    if src_ip.version == 6 and dst_ip.version == 6:
        return 6, str(src_ip), str(dst_ip)
    return None


@given(any_ip, any_ip, ports, ports)
def test_v1_round_trip(src_ip, dst_ip, sport, dport) -> None:
    line = encode_v1((str(src_ip), sport), (str(dst_ip), dport))
    assert len(line) <= V1_MAX_LENGTH
    parsed = parse_v1(line + b"rest")
    assert parsed.header_len == len(line)
    expected = _expected(src_ip, dst_ip)
    if expected is None:
        assert parsed == ParsedV1(15, None, None, "UNKNOWN")
        return
    family, src_text, dst_text = expected
    assert parsed.src is not None and parsed.dst is not None
    assert parsed.protocol == f"TCP{family}"
    assert ipaddress.ip_address(parsed.src[0]) == ipaddress.ip_address(src_text)
    assert ipaddress.ip_address(parsed.dst[0]) == ipaddress.ip_address(dst_text)
    assert (parsed.src[1], parsed.dst[1]) == (sport, dport)


@given(
    any_ip,
    any_ip,
    ports,
    ports,
    st.sampled_from(["stream", "dgram"]),
    st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4),
)
def test_v2_round_trip(src_ip, dst_ip, sport, dport, transport, tlvs) -> None:
    data = encode_v2((str(src_ip), sport), (str(dst_ip), dport), transport, tlvs=tlvs)
    header = decode_v2(data + b"\x00datagram")
    assert header.header_len == len(data)
    assert header.command == "proxy"
    assert header.tlvs == tuple(tlvs)
    expected = _expected(src_ip, dst_ip)
    if expected is None:
        assert (header.family, header.transport, header.src, header.dst) == (0, None, None, None)
        return
    family, src_text, dst_text = expected
    assert header.family == {4: 1, 6: 2}[family]
    assert header.transport == transport
    assert header.src is not None and header.dst is not None
    assert ipaddress.ip_address(header.src[0]) == ipaddress.ip_address(src_text)
    assert ipaddress.ip_address(header.dst[0]) == ipaddress.ip_address(dst_text)
    assert (header.src[1], header.dst[1]) == (sport, dport)


@given(st.binary(max_size=200))
def test_parsers_only_raise_protocol_errors_on_garbage(data: bytes) -> None:
    for parser in (parse_v1, decode_v2):
        try:
            parser(data)
        except ProxyProtocolError:
            pass


@given(st.binary(max_size=120))
def test_v2_parser_on_signature_prefixed_garbage(tail: bytes) -> None:
    try:
        header = decode_v2(SIG + tail)
    except ProxyProtocolError:
        return
    assert header.header_len <= len(SIG) + len(tail)
