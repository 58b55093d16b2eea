"""The parsed flags of ``run`` and ``check`` → one validated ``Settings``.

No click here: the flags arrive as click's params dict, named as ``cli.py`` declares them.
What is checked here is what no single flag can check on its own: the global option
defaults as a whole, forwards that would share a port or a name, and ``--address`` VIPs
that need ``--create-interface``. Every problem is a ``ConfigError`` (exit 2 in the CLI).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from portproxy.config import Settings
from portproxy.errors import ConfigError
from portproxy.spec import (
    Forward,
    ForwardOptions,
    ListenAddress,
    Protocol,
    options_from_pairs,
    parse_forward,
)
from portproxy.spec_values import check_interface_name


def default_options(params: dict[str, Any]) -> ForwardOptions:
    pairs = {"mode": params["mode"], "balance": params["balance"],
             "max-flows": str(params["max_flows"]), "responses": str(params["responses"])}
    if params["proxy_protocol"]:
        pairs["proxy-protocol"] = params["proxy_protocol"]
    if params["allow"]:
        pairs["allow"] = params["allow"]
    try:
        base = options_from_pairs(pairs, ForwardOptions())
    except ConfigError as exc:
        # Every option's message starts with its key, so this names the flag: "--allow: …".
        raise ConfigError(f"invalid --{exc}") from None
    return ForwardOptions(
        mode=base.mode, balance=base.balance, max_flows=base.max_flows,
        responses=base.responses,
        proxy_protocol=base.proxy_protocol, allow=base.allow,
        connect_timeout=params["connect_timeout"], idle_timeout=params["idle_timeout"],
        fin_timeout=params["fin_timeout"], wait_interface=params["wait_interface"],
        freebind=params["freebind"],
    )


def _listen_keys(listen: ListenAddress) -> list[tuple[str, int, str]]:
    """What a listen address takes, per family, as far as the text tells (the bound
    addresses of interfaces are compared at bind time, by ``ListenClaims``)."""
    if listen.kind == "interface":
        # One family may be taken: eth0/ipv4:53 and eth0/ipv6:53 share no address, while
        # eth0:53 (both families) overlaps either.
        families = ("ipv4", "ipv6") if listen.family == "any" else (listen.family,)
        return [(listen.host, listen.port, family) for family in families]
    if listen.host == "":  # all addresses: the IPv4 and the IPv6 wildcard
        return [("*", listen.port, "ipv4"), ("*", listen.port, "ipv6")]
    ip = ipaddress.ip_address(listen.host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # [::ffff:a.b.c.d] takes IPv4 clients of a.b.c.d only
    host = "*" if ip.is_unspecified else ip.compressed
    return [(host, listen.port, f"ipv{ip.version}")]


def build_forwards(specs: Sequence[str], defaults: ForwardOptions, allow_none: bool = False
                   ) -> tuple[Forward, ...]:
    if not specs and not allow_none:
        raise ConfigError("no forwards given: use -f/--forward SPEC (or PORTPROXY_FORWARD)")
    forwards = tuple(parse_forward(spec, defaults) for spec in specs)
    seen: dict[tuple[str, str, int, str], str] = {}
    for forward in forwards:
        listen = forward.listen
        for protocol in forward.protocols:
            keys = [(protocol.value, *key) for key in _listen_keys(listen)]
            taken = next((seen[k] for k in keys if k in seen), None)
            if taken is not None:
                raise ConfigError(f"invalid --forward {forward.spec!r}: {protocol.value} "
                                  f"{listen} is already used by {taken!r}")
            seen.update(dict.fromkeys(keys, forward.spec))
    names = [f.name for f in forwards]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two forwards are named {name!r}; names must be unique")
    return forwards


def settings_from(params: dict[str, Any]) -> Settings:
    from portproxy.admin import parse_admin_address

    defaults = default_options(params)
    configmaps = (params["tcp_services_configmap"], params["udp_services_configmap"])
    settings = Settings(
        forwards=build_forwards(params["forwards"], defaults, allow_none=any(configmaps)),
        forward_defaults=defaults,
        tcp_services_configmap=configmaps[0] or None,
        udp_services_configmap=configmaps[1] or None,
        drain_timeout=params.get("drain_timeout", 30.0),
        use_splice=not params.get("no_splice", False),
        admin_address=_admin_address(params, parse_admin_address),
        max_conns=params.get("max_conns", 0),
        access_log=params.get("access_log", False),
        ready_file=params.get("ready_file") or None,
        kubeconfig=params["kubeconfig"],
        kube_context=params["kube_context"],
        node_name=params["node_name"] or None,
        config_file=params["config"],
        create_interface=params.get("create_interface"),
        workers=params.get("workers", 1),
        log_level=params.get("log_level", "info"),
        log_format=params.get("log_format", "text"),
        interface_addresses=_vip_addresses(params),
    )
    _admin_beside_forwards(settings)
    from portproxy.configmap import configmap_refs

    configmap_refs(settings)  # NS/NAME checked now: a typo is exit 2, not a log line later
    return settings


def _admin_address(params: dict[str, Any], parse: Callable[[str], tuple[str, int] | None]
                   ) -> tuple[str, int] | None:
    text = params.get("admin_address")
    # Absent (commands without an admin endpoint) is none; an empty value is a mistake.
    return None if text is None else parse(text)


def _admin_beside_forwards(settings: Settings) -> None:
    """The admin endpoint's socket shares ports (SO_REUSEPORT, for rollouts): a TCP forward
    on its address would split its clients with it. The text tells for IP addresses;
    interface forwards are compared at bind time."""
    if settings.admin_address is None:
        return
    host, port = settings.admin_address
    admin = set(_listen_keys(ListenAddress("ip", host, port) if host else
                             ListenAddress("any", "", port)))
    for forward in settings.forwards:
        if Protocol.TCP in forward.protocols and admin & set(_listen_keys(forward.listen)):
            raise ConfigError(f"invalid --forward {forward.spec!r}: tcp {forward.listen} is "
                              "also the --admin-address; give them different ports")


def _vip_addresses(params: dict[str, Any]) -> tuple[str, ...]:
    addresses = tuple(params.get("addresses") or ())
    if addresses and not params.get("create_interface"):
        raise ConfigError("--address needs --create-interface NAME")
    if params.get("create_interface") and not addresses:
        raise ConfigError("--create-interface needs at least one --address CIDR")
    if params.get("create_interface"):
        try:
            check_interface_name(params["create_interface"])
        except ConfigError as exc:
            raise ConfigError(f"invalid --create-interface: {exc}") from None
    for address in addresses:
        try:
            ipaddress.ip_interface(address)
        except ValueError:
            raise ConfigError(f"invalid --address {address!r}: not an IP address or CIDR "
                              "(e.g. 169.254.20.10/32)") from None
    return addresses
