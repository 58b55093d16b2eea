"""Option values of the forward spec: the text of one ``key=value`` → a typed value.

Durations (``500ms``, ``30s``), whole numbers, CIDR allowlists, enum names, true/false and
labels. Pure: no sockets, no clock. Which key takes which kind of value is the option table
in ``spec.py``; this module only knows the value syntaxes, so a flag (``--idle-timeout``),
a spec option (``,idle-timeout=``) and a file key all accept the same text.
"""

from __future__ import annotations

import ipaddress
import math
import re
from decimal import Decimal
from enum import StrEnum
from typing import TypeVar

from portproxy.errors import ConfigError

E = TypeVar("E", bound=StrEnum)


class InvalidPart(Exception):
    """A reason, without the spec around it; ``parse_forward`` adds the context."""


_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?$")  # ASCII digits only
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_LABEL = re.compile(r"^[A-Za-z0-9_.:/\-+*\[\]]{1,100}$")
_TRUE = ("", "true", "yes", "1")
_FALSE = ("false", "no", "0")


def parse_duration(text: str) -> float:
    """``500ms``, ``30s``, ``5m``, ``1h`` or plain seconds → seconds (float, finite, >= 0)."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ConfigError(
            f"invalid duration {text!r}: use a number with an optional unit ms, s, m or h "
            "(e.g. 500ms, 30s, 5m, 1h)"
        )
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if not math.isfinite(seconds):  # hundreds of digits: no timer can take that
        raise ConfigError(f"invalid duration {text.strip()[:20]!r}...: too large")
    return seconds


def format_seconds(seconds: float) -> str:
    """Plain seconds that ``parse_duration`` reads back as exactly ``seconds`` (finite,
    >= 0): the shortest repr in positional notation, ``1000000`` not ``1e+06``."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {seconds!r}")
    if float(seconds).is_integer():
        return str(int(seconds))
    return format(Decimal(repr(float(seconds))), "f")


def format_duration(seconds: float) -> str:
    """Whole hours, minutes or seconds with their unit, else plain seconds; read back by
    ``parse_duration`` as exactly ``seconds`` (no rounding to milliseconds)."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return format_seconds(seconds)


def duration(key: str, value: str, allow_zero: bool) -> float:
    try:
        seconds = parse_duration(value)
    except ConfigError as exc:
        raise InvalidPart(f"{key}: {exc}") from None
    if seconds == 0 and not allow_zero:
        raise InvalidPart(f"{key} must be greater than 0")
    return seconds


def is_decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²' or '٣', which ``int`` refuses
    (or reads as another number), and a ConfigMap value can hold anything."""
    return text.isascii() and text.isdigit()


def count(key: str, value: str) -> int:
    if not is_decimal(value):
        raise InvalidPart(f"{key}={value!r} is not a whole number")
    return int(value)


def allowlist(value: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``CIDR;CIDR...`` → networks; host bits are allowed (10.1.2.3/8 means 10.0.0.0/8)."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for part in value.split(";"):
        if not part.strip():
            continue
        try:
            network = ipaddress.ip_network(part.strip(), strict=False)
        except ValueError:
            raise InvalidPart(
                f"allow: {part!r} is not a CIDR (e.g. 10.0.0.0/8, fd00::/8)") from None
        networks.append(_unmapped_network(network))
    return tuple(networks)


def _unmapped_network(network: ipaddress.IPv4Network | ipaddress.IPv6Network,
                      ) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """``::ffff:10.0.0.0/104`` → ``10.0.0.0/8``: the engines compare IPv4 clients of
    dual-stack sockets unmapped, so a mapped entry would otherwise never match anyone."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    return network


def enum_member(key: str, value: str, enum: type[E]) -> E:
    allowed = [e.value for e in enum]
    if value not in allowed:
        raise InvalidPart(f"{key}={value!r} is not one of {', '.join(allowed)}")
    return enum(value)


def flag(key: str, value: str) -> bool:
    """A flag option; given without ``=VALUE`` it arrives here as ``""``, meaning true."""
    if value.lower() not in _TRUE + _FALSE:
        raise InvalidPart(f"{key}={value!r}: use true or false")
    return value.lower() in _TRUE


def label(key: str, value: str) -> str:
    if not _LABEL.match(value):
        raise InvalidPart(f"{key}={value!r}: use 1-100 letters, digits or . _ - : / + *")
    return value


def check_interface_name(name: str) -> None:
    """ConfigError unless the kernel's dev_valid_name() would accept ``name``: what it would
    refuse can never exist."""
    valid = (
        0 < len(name.encode()) < 16  # IFNAMSIZ, with its NUL
        and name not in (".", "..")
        and not any(ch == "/" or ch == ":" or ch.isspace() for ch in name)
    )
    if not valid:
        raise ConfigError(f"invalid interface name {name!r}: 1-15 bytes, no '/', ':' or whitespace")
