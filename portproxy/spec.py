"""The forward spec: ``[PROTO://][ADDRESS:]PORT=TARGET[,KEY=VALUE...]`` (DESIGN §1).

Pure parsing into frozen dataclasses; no sockets, no DNS, no clock. Every error is a
``ConfigError`` that quotes the spec and names the offending part, e.g.
``invalid --forward 'tcp://:99999=x:1': port 99999 is out of range 1-65535``.

This module holds the grammar (listen address, target, options) and the option table (which
key takes which kind of value); the value syntaxes themselves (durations, CIDR lists...) are
in ``spec_values``, shared with the flags and the config file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any, Literal

from portproxy.endpoints import BalancePolicy
from portproxy.errors import ConfigError
from portproxy.spec_values import (
    InvalidPart,
    allowlist,
    count,
    duration,
    enum_member,
    flag,
    is_decimal,
    label,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(StrEnum):
    TCP = "tcp"
    UDP = "udp"


class TargetMode(StrEnum):
    """How a Service target is reached: its pods directly, or its ClusterIP via kube-proxy."""

    ENDPOINTS = "endpoints"
    CLUSTERIP = "clusterip"


class ProxyProtocol(StrEnum):
    V1 = "v1"
    V2 = "v2"


DEFAULT_TCP_IDLE_TIMEOUT = 3600.0
DEFAULT_UDP_IDLE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class ForwardOptions:
    """Per-forward options (``,key=value``); each also has a global ``--key`` default."""

    mode: TargetMode = TargetMode.ENDPOINTS
    """Service targets only: pods from EndpointSlices (default) or the ClusterIP."""
    balance: BalancePolicy = BalancePolicy.ROUND_ROBIN
    """How a new connection or UDP flow chooses its endpoint."""
    connect_timeout: float = 5.0
    """Seconds to wait for a backend's TCP handshake before trying the next endpoint.
    5 s outlasts one SYN retransmission (1 s) twice over without hanging clients."""
    idle_timeout: float | None = None
    """Seconds without traffic after which a connection/flow is closed; 0 disables.
    None means the protocol default: 1 h for TCP (HAProxy-like), 30 s for UDP (DNS-like)."""
    max_conns: int = 0
    """TCP connections open at once on this forward; 0 is unlimited. At the limit the
    listener stops accepting (the kernel backlog holds new clients) until one closes."""
    max_flows: int = 10000
    """UDP flows at once; the least recently used one is evicted at the limit. Bounds
    memory (one socket per flow) under a flood of spoofed sources."""
    responses: int = 0
    """UDP: replies expected per client datagram. Once a flow has relayed them all it ends at
    once (DNS: 1), instead of waiting out its idle timeout; 0 means not limited. Like
    nginx's ``proxy_responses``, except that 0 is the unlimited default here."""
    proxy_protocol: ProxyProtocol | None = None
    """Send a PROXY protocol header (v1 text or v2 binary) first to the backend."""
    allow: tuple[IPNetwork, ...] = ()
    """Client allowlist; empty admits everyone."""
    fin_timeout: float = 300.0
    """Seconds a half-closed TCP connection may wait for its other direction; 0 disables."""
    wait_interface: bool = False
    """An interface listen address may be missing at start; wait for it instead of failing."""
    freebind: bool = False
    """Bind an IP listen address even if this host does not have it (yet), with IP_FREEBIND:
    the listener starts receiving once the address is added (failover VIPs, DHCP)."""
    name: str | None = None
    """Label for logs and metrics; derived from the spec when unset."""

    def idle_timeout_for(self, protocol: Protocol) -> float:
        if self.idle_timeout is not None:
            return self.idle_timeout
        return DEFAULT_TCP_IDLE_TIMEOUT if protocol is Protocol.TCP else DEFAULT_UDP_IDLE_TIMEOUT


OPTION_KEYS = tuple(f.name.replace("_", "-") for f in fields(ForwardOptions))


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where a forward listens.

    ``kind`` is ``any`` (all addresses, dual-stack), ``ip`` (one literal) or ``interface``
    (every address of a named interface, optionally one family, following changes).
    """

    kind: Literal["any", "ip", "interface"]
    host: str
    port: int
    family: Literal["any", "ipv4", "ipv6"] = "any"

    def __str__(self) -> str:
        if self.kind == "any":
            return f"*:{self.port}"
        if self.kind == "interface":
            suffix = "" if self.family == "any" else f"/{self.family}"
            return f"{self.host}{suffix}:{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class HostTarget:
    """A static IP literal or a DNS name (re-resolved periodically)."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """A Kubernetes Service; ``port`` is the service port's number or name."""

    namespace: str
    name: str
    port: int | str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}:{self.port}"


Target = HostTarget | ServiceTarget


@dataclass(frozen=True, slots=True)
class Forward:
    """One parsed ``--forward``: what to listen on, where to send it, and how."""

    spec: str
    protocols: tuple[Protocol, ...]
    listen: ListenAddress
    target: Target
    options: ForwardOptions = field(default_factory=ForwardOptions)

    @property
    def name(self) -> str:
        if self.options.name:
            return self.options.name
        protos = "+".join(p.value for p in self.protocols)
        return f"{protos}/{self.listen}"


_PROTOCOLS = {
    "tcp": (Protocol.TCP,),
    "udp": (Protocol.UDP,),
    "tcp+udp": (Protocol.TCP, Protocol.UDP),
    "udp+tcp": (Protocol.TCP, Protocol.UDP),
}
_INTERFACE = re.compile(r"^[A-Za-z0-9_.\-@]{1,15}$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9_]([-A-Za-z0-9_]{0,61}[A-Za-z0-9])?$")


def parse_port(text: str, what: str = "port") -> int:
    if not is_decimal(text):
        raise InvalidPart(f"{what} {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidPart(f"{what} {port} is out of range 1-65535")
    return port


def _parse_listen(text: str) -> tuple[tuple[Protocol, ...], ListenAddress]:
    protocols: tuple[Protocol, ...] = (Protocol.TCP,)
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() not in _PROTOCOLS:
            raise InvalidPart(f"protocol {scheme!r} is not one of tcp, udp, tcp+udp")
        protocols = _PROTOCOLS[scheme.lower()]
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidPart(f"listen address {text!r}: expected [IPv6]:PORT")
        address = _ipv6(host, "listen address")
        return protocols, ListenAddress("ip", str(address), parse_port(rest[1:]))
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return protocols, ListenAddress("any", "", parse_port(port_text))
    if host in ("", "*"):
        return protocols, ListenAddress("any", "", parse_port(port_text))
    if ":" in host:
        raise InvalidPart(f"listen address {host!r}: write IPv6 addresses in brackets, [{host}]")
    if re.fullmatch(r"[\d.]+", host):
        try:
            return protocols, ListenAddress(
                "ip", str(ipaddress.IPv4Address(host)), parse_port(port_text))
        except ipaddress.AddressValueError:
            raise InvalidPart(f"listen address {host!r} is not an IPv4 address") from None
    return protocols, _parse_interface(host, parse_port(port_text))


def _ipv6(host: str, what: str) -> ipaddress.IPv6Address:
    try:
        address = ipaddress.IPv6Address(host)
    except ValueError:
        raise InvalidPart(f"{what} {host!r} is not an IPv6 address") from None
    if address.is_link_local and not address.scope_id:
        # The same fe80:: address may exist on every link: the kernel refuses to bind or
        # connect without knowing which (EINVAL at run time, naming nothing).
        raise InvalidPart(f"{what} {host!r} is link-local: add its zone, [{host}%IFACE]")
    return address


def _parse_interface(text: str, port: int) -> ListenAddress:
    name, _, family = text.partition("/")
    if family not in ("", "ipv4", "ipv6"):
        raise InvalidPart(f"interface {text!r}: the family after '/' must be ipv4 or ipv6")
    if not _INTERFACE.match(name):
        raise InvalidPart(
            f"listen address {name!r} is neither an IP address nor an interface name "
            "(1-15 characters of letters, digits, '-', '_', '.')"
        )
    fam: Literal["any", "ipv4", "ipv6"] = "ipv4" if family == "ipv4" else (
        "ipv6" if family == "ipv6" else "any")
    return ListenAddress("interface", name, port, fam)


def _parse_target(text: str) -> Target:
    if not text:
        raise InvalidPart("target is missing after '='")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidPart(f"target {text!r}: expected [IPv6]:PORT")
        address = _ipv6(host, "target")
        return HostTarget(str(address), parse_port(rest[1:], "target port"))
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise InvalidPart(f"target {text!r} needs a port: HOST:PORT or NAMESPACE/NAME:PORT")
    if "/" in host:
        return _parse_service(host, port_text)
    if ":" in host:
        raise InvalidPart(f"target {host!r}: write IPv6 addresses in brackets, [{host}]")
    return HostTarget(_validate_host(host), parse_port(port_text, "target port"))


def _parse_service(host: str, port_text: str) -> ServiceTarget:
    namespace, _, name = host.partition("/")
    if not _DNS_LABEL.match(namespace):
        raise InvalidPart(f"namespace {namespace!r} is not a valid Kubernetes namespace name")
    if not _DNS_1035.match(name):
        raise InvalidPart(f"service name {name!r} is not a valid Kubernetes Service name")
    if is_decimal(port_text):
        return ServiceTarget(namespace, name, parse_port(port_text, "service port"))
    # A Service port name is a DNS label (up to 63); the 15-character IANA limit is for
    # container port names. One of digits only would read as a number here.
    if not _DNS_LABEL.match(port_text) or not re.search("[a-z]", port_text):
        raise InvalidPart(
            f"service port {port_text!r} is neither a number nor a valid port name "
            "(lowercase letters, digits and '-', at most 63)"
        )
    return ServiceTarget(namespace, name, port_text)


def _validate_host(host: str) -> str:
    if re.fullmatch(r"[\d.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ipaddress.AddressValueError:
            raise InvalidPart(f"target {host!r} is not a valid IPv4 address") from None
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(_HOSTNAME_LABEL.match(part) for part in labels):
        raise InvalidPart(f"target host {host!r} is not a valid IP address or DNS name")
    return host


_FLAG_KEYS = ("wait-interface", "freebind")


def option_values(pairs: Mapping[str, str]) -> dict[str, object]:
    """Validate ``key -> text`` option pairs into ``ForwardOptions`` field values."""
    values: dict[str, object] = {}
    for key, value in pairs.items():
        attr = key.replace("-", "_")
        if key == "mode":
            values[attr] = enum_member(key, value, TargetMode)
        elif key == "balance":
            values[attr] = enum_member(key, value, BalancePolicy)
        elif key == "proxy-protocol":
            values[attr] = enum_member(key, value, ProxyProtocol)
        elif key == "connect-timeout":
            values[attr] = duration(key, value, allow_zero=False)
        elif key in ("idle-timeout", "fin-timeout"):
            values[attr] = duration(key, value, allow_zero=True)
        elif key in ("max-conns", "max-flows", "responses"):
            values[attr] = count(key, value)
        elif key == "allow":
            values[attr] = allowlist(value)
        elif key in _FLAG_KEYS:
            values[attr] = flag(key, value)
        elif key == "name":
            values[attr] = label(key, value)
        else:
            raise InvalidPart(f"unknown option {key!r} (known: {', '.join(OPTION_KEYS)})")
    return values


def _split_options(parts: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not key:
            raise InvalidPart(f"option {part!r} has no key")
        if not sep and key not in _FLAG_KEYS:
            raise InvalidPart(f"option {key!r} needs a value: {key}=VALUE")
        if key in pairs:
            raise InvalidPart(f"option {key!r} is given twice")
        pairs[key] = value.strip()
    return pairs


def options_from_pairs(pairs: Mapping[str, str], base: ForwardOptions) -> ForwardOptions:
    """Apply validated ``key=value`` options on top of ``base`` (raises ConfigError)."""
    try:
        return replace(base, **option_values(pairs))  # type: ignore[arg-type]
    except InvalidPart as exc:
        raise ConfigError(str(exc)) from None


def parse_forward(text: str, defaults: ForwardOptions | None = None) -> Forward:
    """Parse one ``--forward`` spec; ``defaults`` carries the global ``--KEY`` options."""
    try:
        return _parse_forward(text, defaults or ForwardOptions())
    except InvalidPart as exc:
        raise ConfigError(f"invalid --forward {text!r}: {exc}") from None


def _parse_forward(text: str, defaults: ForwardOptions) -> Forward:
    stripped = text.strip()
    if not stripped:
        raise InvalidPart("the spec is empty; expected [PROTO://][ADDRESS:]PORT=TARGET")
    if any(ch.isspace() for ch in stripped):
        raise InvalidPart("the spec contains whitespace")
    listen_text, sep, rest = stripped.partition("=")
    if not sep:
        raise InvalidPart("missing '=': expected [PROTO://][ADDRESS:]PORT=TARGET")
    protocols, listen = _parse_listen(listen_text)
    target_text, *option_parts = rest.split(",")
    target = _parse_target(target_text)
    _check_not_itself(listen, target)
    pairs = _split_options(option_parts)
    values = option_values(pairs)
    _check_applicable(pairs.keys(), protocols, target)
    defaults = _where_applicable(defaults, protocols, listen)
    options = replace(defaults, **values)  # type: ignore[arg-type]
    _check_consistency(protocols, listen, target, options, explicit=pairs.keys())
    return Forward(stripped, protocols, listen, target, options)


#: Options that one protocol never reads. Given in a spec where they cannot apply they are a
#: mistake (a UDP forward with ``max-conns`` would be silently unlimited), so they are
#: rejected; the global ``--KEY`` defaults apply wherever they can and are never an error.
_TCP_ONLY = ("connect-timeout", "fin-timeout", "max-conns")
_UDP_ONLY = ("max-flows", "responses")


def _check_not_itself(listen: ListenAddress, target: object) -> None:
    """A static target that is the forward's own listen address: each connection would open
    another through the proxy until no descriptor is left. Only an exact match is refused:
    beside a wildcard listener, a more specific one (a local DNS server on 127.0.0.53:53)
    takes the connections to its address, so ``:53=127.0.0.53:53`` can be meant."""
    if not isinstance(target, HostTarget) or not target.is_ip or target.port != listen.port \
            or listen.kind != "ip":
        return
    own = _unmapped_ip(listen.host)
    # Zones count: fe80::1%eth0 and fe80::1%eth1 are addresses on two links.
    same_zone = listen.host.partition("%")[2] == target.host.partition("%")[2]
    if not own.is_unspecified and same_zone and _unmapped_ip(target.host) == own:
        raise InvalidPart(f"target {target} is this forward's own listen address: every "
                          "connection would loop back into it")


def _unmapped_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _where_applicable(defaults: ForwardOptions, protocols: tuple[Protocol, ...],
                      listen: ListenAddress) -> ForwardOptions:
    """The global defaults apply where they can: dropped where a spec would be an error."""
    changes: dict[str, Any] = {}
    if defaults.proxy_protocol is ProxyProtocol.V1 and Protocol.TCP not in protocols:
        # UDP has no v1. A tcp+udp forward keeps it for its TCP side (the UDP engine only
        # ever sends v2).
        changes["proxy_protocol"] = None
    if defaults.wait_interface and listen.kind != "interface":
        changes["wait_interface"] = False
    if defaults.freebind and listen.kind != "ip":
        changes["freebind"] = False
    return replace(defaults, **changes) if changes else defaults


def _check_applicable(keys: Iterable[str], protocols: tuple[Protocol, ...],
                      target: Target) -> None:
    for key in keys:
        if key in _TCP_ONLY and Protocol.TCP not in protocols:
            raise InvalidPart(f"option {key!r} is TCP only; this forward listens on UDP")
        if key in _UDP_ONLY and Protocol.UDP not in protocols:
            raise InvalidPart(f"option {key!r} is UDP only; this forward listens on TCP")
        if key == "mode" and not isinstance(target, ServiceTarget):
            raise InvalidPart("option 'mode' only applies to a Service target "
                              "(NAMESPACE/NAME:PORT)")


def _check_consistency(
    protocols: tuple[Protocol, ...], listen: ListenAddress, target: Target,
    options: ForwardOptions, explicit: Iterable[str],
) -> None:
    if (options.proxy_protocol is ProxyProtocol.V1 and Protocol.UDP in protocols
            and "proxy-protocol" in explicit):
        raise InvalidPart("proxy-protocol=v1 is TCP only; UDP forwards can use v2")
    if options.wait_interface and listen.kind != "interface":
        raise InvalidPart("wait-interface only applies to an interface listen address")
    if options.freebind and listen.kind != "ip":
        raise InvalidPart("freebind only applies to an IP listen address")
