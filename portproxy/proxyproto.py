"""PROXY protocol headers (HAProxy's ``doc/proxy-protocol.txt``), versions 1 and 2.

Pure: addresses in, bytes out (and bytes in, addresses out for the parsers). The encoders are
what the engines send to a backend; the parsers exist for the tests and the test backends
that check what arrived, and are strict so a wrong header fails a test instead of passing it.

Addresses are socket-style tuples: ``(host, port)`` or IPv6's ``(host, port, flowinfo,
scope_id)``; ``host`` is an IP literal (a ``%scope`` suffix is dropped, the header has no
room for it). ``None`` means "not known". IPv4-mapped IPv6 addresses (``::ffff:a.b.c.d``,
what a dual-stack listener reports for an IPv4 client) are written as IPv4 when both
addresses are IPv4 or mapped, so the backend sees the client's real family. Any other mix
of families cannot be described in one header: v1 then sends ``UNKNOWN`` and v2 ``AF_UNSPEC``
with the PROXY command, which is what the spec prescribes for "unsupported" connections.

Cost and caching: one encode is a couple of ``inet_pton`` calls and one ``struct.pack`` —
a few microseconds. TCP encodes once per connection. UDP (v2, ``dgram``) must *not* encode
per datagram: the engine calls ``encode_v2`` once when a flow is created, keeps the bytes on
the flow object and prepends them to every datagram sent to the backend (``header +
payload``, or ``sendmsg([header, payload])`` to avoid the copy). Replies are relayed without
a header. The bytes are immutable, so sharing them for the life of the flow is safe.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

SockAddr = tuple[str, int] | tuple[str, int, int, int]
"""A socket address as Python's socket module returns it (IPv4 or IPv6 shape)."""
Address = tuple[str, int]
"""A decoded address: canonical IP text and port."""
Transport = Literal["stream", "dgram"]
Command = Literal["proxy", "local"]

V1_MAX_LENGTH = 107
"""Longest v1 line a receiver must accept, CRLF included (spec section 2.1)."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes every v2 header starts with (spec section 2.2)."""
V2_FIXED_LENGTH = 16
"""Signature, version/command, family/transport and the 16-bit length."""

_V1_PREFIX = b"PROXY "
_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
_VERSION_2 = 0x20
_COMMANDS: dict[str, int] = {"local": 0x0, "proxy": 0x1}
_TRANSPORTS: dict[str, int] = {"stream": 0x1, "dgram": 0x2}
_TRANSPORT_NAMES: dict[int, Transport] = {0x1: "stream", 0x2: "dgram"}
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
# Bytes of the address block for each v2 address family (ports included for INET ones).
_ADDRESS_BLOCK = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}
# The only family/transport bytes the spec allows; receivers must reject all others.
_VALID_FAMILY_BYTES = frozenset({0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32})
_FIXED = struct.Struct("!12sBBH")
_INET4 = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
_TLV_HEAD = struct.Struct("!BH")
_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_MAX_U16 = 0xFFFF


class ProxyProtocolError(ValueError):
    """Bytes that are not a valid PROXY protocol header (the sender's fault)."""


class IncompleteHeaderError(ProxyProtocolError):
    """The bytes so far are a valid beginning of a header: read more and try again."""


class ParsedV1(NamedTuple):
    """A decoded v1 line. ``src``/``dst`` are ``None`` for ``UNKNOWN``."""

    header_len: int
    src: Address | None
    dst: Address | None
    protocol: Literal["TCP4", "TCP6", "UNKNOWN"]


class ParsedV2(NamedTuple):
    """The fields of a v2 header most users need. ``src``/``dst`` are ``None`` for LOCAL,
    AF_UNSPEC and AF_UNIX; ``transport`` is ``None`` for UNSPEC."""

    header_len: int
    src: Address | None
    dst: Address | None
    transport: Transport | None


@dataclass(frozen=True, slots=True)
class HeaderV2:
    """Everything in a decoded v2 header. ``header_len`` counts the 16 fixed bytes too."""

    header_len: int
    command: Command
    family: int
    """The address family nibble: 0 unspec, 1 IPv4, 2 IPv6, 3 unix."""
    transport: Transport | None
    src: Address | None
    dst: Address | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


class _Pair(NamedTuple):
    """Both addresses packed in one common family (4 or 6)."""

    family: Literal[4, 6]
    src: bytes
    dst: bytes
    src_port: int
    dst_port: int


def _pack_host(host: str) -> bytes:
    """4 bytes for IPv4 text, 16 for IPv6 text (scope suffix dropped)."""
    bare = host.split("%", 1)[0]
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, bare)
        except (OSError, ValueError):
            continue
    raise ValueError(f"not an IP address: {host!r}")


def _port(addr: SockAddr) -> int:
    port = addr[1]
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= _MAX_U16:
        raise ValueError(f"port out of range 0-65535: {port!r}")
    return port


def _unmapped(packed: bytes) -> bytes:
    """IPv4-mapped IPv6 → the 4 IPv4 bytes; anything else unchanged."""
    if len(packed) == 16 and packed.startswith(_MAPPED_PREFIX):
        return packed[12:]
    return packed


def _pair(src: SockAddr | None, dst: SockAddr | None) -> _Pair | None:
    """Both addresses in one family, or ``None`` when that cannot be done honestly."""
    if src is None or dst is None:
        return None
    src_port, dst_port = _port(src), _port(dst)
    src_ip, dst_ip = _pack_host(src[0]), _pack_host(dst[0])
    src4, dst4 = _unmapped(src_ip), _unmapped(dst_ip)
    if len(src4) == 4 and len(dst4) == 4:
        return _Pair(4, src4, dst4, src_port, dst_port)
    if len(src_ip) == 16 and len(dst_ip) == 16:
        # One side mapped, the other a real IPv6 address: both are IPv6 addresses as far
        # as the socket is concerned, so TCP6 describes them faithfully.
        return _Pair(6, src_ip, dst_ip, src_port, dst_port)
    return None


def encode_v1(src: SockAddr | None, dst: SockAddr | None) -> bytes:
    """The v1 text line, CRLF included (at most 104 bytes for TCP6, 56 for TCP4).

    v1 describes TCP only; ``PROXY UNKNOWN\\r\\n`` is sent when an address is unknown or
    the families cannot be reconciled (see the module docstring).
    """
    pair = _pair(src, dst)
    if pair is None:
        return _V1_UNKNOWN
    family = socket.AF_INET if pair.family == 4 else socket.AF_INET6
    line = (
        f"PROXY TCP{pair.family} {socket.inet_ntop(family, pair.src)} "
        f"{socket.inet_ntop(family, pair.dst)} {pair.src_port} {pair.dst_port}\r\n"
    )
    return line.encode("ascii")


def _encode_tlvs(tlvs: Sequence[tuple[int, bytes]]) -> bytes:
    parts: list[bytes] = []
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV type out of range 0-255: {kind!r}")
        if len(value) > _MAX_U16:
            raise ValueError(f"TLV value too long: {len(value)} bytes")
        parts.append(_TLV_HEAD.pack(kind, len(value)))
        parts.append(bytes(value))
    return b"".join(parts)


def encode_v2(
    src: SockAddr | None,
    dst: SockAddr | None,
    transport: Transport,
    command: Command = "proxy",
    tlvs: Sequence[tuple[int, bytes]] = (),
) -> bytes:
    """The v2 binary header: 16 fixed bytes, the address block, then ``tlvs`` in order.

    ``transport`` is ``"stream"`` (TCP: family byte 0x11/0x21) or ``"dgram"`` (UDP: 0x12/
    0x22). The LOCAL command (health checks, not relayed traffic) carries no addresses and
    family byte 0x00. Unknown or irreconcilable addresses give PROXY with AF_UNSPEC (0x00)
    and no address block. Raises ``ValueError`` for a bad port, host, TLV or a header that
    would not fit the 16-bit length field.
    """
    if transport not in _TRANSPORTS:
        raise ValueError(f"transport must be 'stream' or 'dgram', not {transport!r}")
    if command not in _COMMANDS:
        raise ValueError(f"command must be 'proxy' or 'local', not {command!r}")
    extra = _encode_tlvs(tlvs)
    pair = _pair(src, dst) if command == "proxy" else None
    if pair is None:
        family_byte, addresses = 0x00, b""
    elif pair.family == 4:
        family_byte = _AF_INET << 4 | _TRANSPORTS[transport]
        addresses = _INET4.pack(pair.src, pair.dst, pair.src_port, pair.dst_port)
    else:
        family_byte = _AF_INET6 << 4 | _TRANSPORTS[transport]
        addresses = _INET6.pack(pair.src, pair.dst, pair.src_port, pair.dst_port)
    length = len(addresses) + len(extra)
    if length > _MAX_U16:
        raise ValueError(f"PROXY v2 header too long: {length} bytes after the fixed part")
    fixed = _FIXED.pack(V2_SIGNATURE, _VERSION_2 | _COMMANDS[command], family_byte, length)
    return fixed + addresses + extra


def encode_header(
    version: Literal[1, 2] | str,
    src: SockAddr | None,
    dst: SockAddr | None,
    transport: Transport,
) -> bytes:
    """The header a forward configured with ``proxy-protocol=<version>`` sends.

    ``version`` is 1 or 2, or the option's text ``"v1"``/``"v2"`` (so the config's string
    enum can be passed as it is). v1 exists for TCP only, so v1 with ``"dgram"`` is a
    ``ValueError`` (config validation should have refused it already).
    """
    if version in (1, "v1"):
        if transport != "stream":
            raise ValueError("PROXY protocol v1 describes TCP only; use v2 for UDP")
        return encode_v1(src, dst)
    if version in (2, "v2"):
        return encode_v2(src, dst, transport)
    raise ValueError(f"PROXY protocol version must be v1 or v2, not {version!r}")


# ---------------------------------------------------------------------------- parsing


def _v1_port(text: bytes) -> int:
    # Decimal, no sign, no heading zeroes (the spec forbids them to avoid octal confusion).
    if not text.isdigit() or (len(text) > 1 and text.startswith(b"0")):
        raise ProxyProtocolError(f"bad port in PROXY v1 line: {text!r}")
    port = int(text)
    if port > _MAX_U16:
        raise ProxyProtocolError(f"port out of range in PROXY v1 line: {text!r}")
    return port


def _v1_host(text: bytes, family: socket.AddressFamily) -> str:
    try:
        decoded = text.decode("ascii")
        canonical = socket.inet_ntop(family, socket.inet_pton(family, decoded))
    except (UnicodeDecodeError, OSError, ValueError):
        raise ProxyProtocolError(f"bad address in PROXY v1 line: {text!r}") from None
    # IPv4 has exactly one spelling (no heading zeroes); IPv6 may use either case and any
    # valid compression, so only IPv4 is compared with its canonical form.
    if family == socket.AF_INET and canonical != decoded:
        raise ProxyProtocolError(f"non-canonical IPv4 address in PROXY v1 line: {text!r}")
    return canonical


def _v1_incomplete(data: bytes) -> bool:
    """True when ``data`` could still become a valid line with more bytes."""
    if b"\n" in data or b"\r" in data[:-1]:
        return False
    if len(data) < len(_V1_PREFIX):
        return _V1_PREFIX.startswith(data)
    # The CRLF must end by byte 107: a pending CR may be at most at 106, text at most 105.
    limit = V1_MAX_LENGTH - 1 if data.endswith(b"\r") else V1_MAX_LENGTH - 2
    return data.startswith(_V1_PREFIX) and len(data) <= limit


def parse_v1(data: bytes) -> ParsedV1:
    """Decode a v1 line at the start of ``data`` (bytes after the CRLF are ignored).

    Raises ``IncompleteHeaderError`` when more bytes are needed and ``ProxyProtocolError``
    for anything the spec says a receiver must reject (no CRLF within 107 bytes, a lone
    CR or LF, wrong spacing, heading zeroes, an address of the wrong family).
    """
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if _v1_incomplete(data):
            raise IncompleteHeaderError("PROXY v1 line not complete yet")
        raise ProxyProtocolError("no valid PROXY v1 line (CRLF missing within 107 bytes)")
    line = data[:end]
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("lone CR or LF in PROXY v1 line")
    fields = line.split(b" ")
    if fields[0] != b"PROXY" or len(fields) < 2:
        raise ProxyProtocolError("PROXY v1 line must start with 'PROXY '")
    if fields[1] == b"UNKNOWN":
        # The receiver must ignore whatever follows UNKNOWN up to the CRLF.
        return ParsedV1(end + 2, None, None, "UNKNOWN")
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(f"malformed PROXY v1 line: {line!r}")
    family = socket.AF_INET if fields[1] == b"TCP4" else socket.AF_INET6
    src = (_v1_host(fields[2], family), _v1_port(fields[4]))
    dst = (_v1_host(fields[3], family), _v1_port(fields[5]))
    return ParsedV1(end + 2, src, dst, "TCP4" if family == socket.AF_INET else "TCP6")


def _decode_tlvs(block: bytes) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(block):
        if len(block) - offset < _TLV_HEAD.size:
            raise ProxyProtocolError("truncated TLV header in PROXY v2 header")
        kind, length = _TLV_HEAD.unpack_from(block, offset)
        offset += _TLV_HEAD.size
        if len(block) - offset < length:
            raise ProxyProtocolError("TLV value overruns the PROXY v2 header")
        tlvs.append((kind, block[offset : offset + length]))
        offset += length
    return tuple(tlvs)


def _decode_addresses(family: int, block: bytes) -> tuple[Address | None, Address | None]:
    if family == _AF_INET:
        src_ip, dst_ip, src_port, dst_port = _INET4.unpack_from(block)
        af = socket.AF_INET
    elif family == _AF_INET6:
        src_ip, dst_ip, src_port, dst_port = _INET6.unpack_from(block)
        af = socket.AF_INET6
    else:
        return None, None  # AF_UNSPEC carries nothing; AF_UNIX paths are not IP addresses
    return (socket.inet_ntop(af, src_ip), src_port), (socket.inet_ntop(af, dst_ip), dst_port)


def decode_v2(data: bytes) -> HeaderV2:
    """Decode a v2 header at the start of ``data`` (bytes after it are ignored).

    Raises ``IncompleteHeaderError`` when ``data`` is a valid but short prefix, and
    ``ProxyProtocolError`` for a wrong signature, version, command or family byte, or an
    address block shorter than its family needs.
    """
    if len(data) < V2_FIXED_LENGTH:
        if V2_SIGNATURE.startswith(data[: len(V2_SIGNATURE)]):
            raise IncompleteHeaderError("PROXY v2 header not complete yet")
        raise ProxyProtocolError("not a PROXY v2 signature")
    signature, ver_cmd, family_byte, length = _FIXED.unpack_from(data)
    if signature != V2_SIGNATURE:
        raise ProxyProtocolError("not a PROXY v2 signature")
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"unsupported PROXY version nibble: {ver_cmd >> 4}")
    command: Command
    if ver_cmd & 0x0F == _COMMANDS["local"]:
        command = "local"
    elif ver_cmd & 0x0F == _COMMANDS["proxy"]:
        command = "proxy"
    else:
        raise ProxyProtocolError(f"unassigned PROXY v2 command: {ver_cmd & 0x0F}")
    if family_byte not in _VALID_FAMILY_BYTES:
        raise ProxyProtocolError(f"invalid PROXY v2 family/transport byte: {family_byte:#04x}")
    header_len = V2_FIXED_LENGTH + length
    if len(data) < header_len:
        raise IncompleteHeaderError("PROXY v2 header not complete yet")
    body = data[V2_FIXED_LENGTH:header_len]
    family, transport_nibble = family_byte >> 4, family_byte & 0x0F
    address_len = _ADDRESS_BLOCK[family]
    if length < address_len:
        raise ProxyProtocolError("PROXY v2 length shorter than its address block")
    transport = _TRANSPORT_NAMES.get(transport_nibble)
    src: Address | None = None
    dst: Address | None = None
    if command == "proxy":
        src, dst = _decode_addresses(family, body[:address_len])
    tlvs = _decode_tlvs(body[address_len:])
    return HeaderV2(header_len, command, family, transport, src, dst, tlvs)


def parse_v2(data: bytes) -> ParsedV2:
    """``(header_len, src, dst, transport)`` of the v2 header at the start of ``data``.

    Same errors as ``decode_v2``; use that for the command and TLVs.
    """
    header = decode_v2(data)
    return ParsedV2(header.header_len, header.src, header.dst, header.transport)
