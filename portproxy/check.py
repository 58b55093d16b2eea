"""``portproxy check``: what ``run`` would do, tried once, as a table.

Parses (already done by the CLI), test-binds every listener and releases it, and resolves
each target once (DNS or the Kubernetes API) unless ``offline``. A row fails when ``run``
would fail or serve nothing for it.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from portproxy.endpoints import EndpointSet
from portproxy.errors import PortproxyError, ResolveError, SetupError
from portproxy.listen_claims import BoundKey, bound_keys, clash
from portproxy.resolve.dns import system_lookup
from portproxy.sockets import BindRequest, bind_socket
from portproxy.spec import Forward, HostTarget, Protocol, ServiceTarget


@dataclass(frozen=True, slots=True)
class CheckRow:
    forward: str
    listen: str
    target: str
    mode: str
    endpoints: str
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def listen_hosts(forward: Forward, created: str | None = None) -> list[str]:
    """The addresses ``run`` would bind for ``forward`` right now. ``created`` names the
    ``--create-interface`` link, which ``run`` makes first and ``check`` does not: a forward
    on it binds what it already has (nothing while it does not exist)."""
    listen = forward.listen
    if listen.kind != "interface":
        return [listen.host]
    from portproxy.netlink import interface_addresses, interface_exists

    if not interface_exists(listen.host):
        if forward.options.wait_interface or listen.host == created:
            return []
        raise SetupError(f"forward {forward.name}: interface {listen.host} does not exist "
                         "(add wait-interface to wait for it)")
    return interface_addresses(listen.host, listen.family)


@dataclass
class BindTest:
    """Test-binds every forward's listeners and releases each at once (a UDP socket joining
    a running instance's SO_REUSEPORT group would take some of its datagrams), remembering
    the addresses so that two forwards on one address clash as they would at ``run``."""

    created: str | None = None
    """The ``--create-interface`` name, if any (see ``listen_hosts``)."""
    seen: dict[BoundKey, str] = field(default_factory=dict)

    def bind(self, forward: Forward) -> None:
        kinds = {Protocol.TCP: socket.SOCK_STREAM, Protocol.UDP: socket.SOCK_DGRAM}
        for host in listen_hosts(forward, self.created):
            for protocol in forward.protocols:
                with bind_socket(BindRequest(host, forward.listen.port, kind=kinds[protocol],
                                             freebind=forward.options.freebind, listen=False),
                                 forward.name) as sock:
                    keys = bound_keys(sock)
                for key in keys:
                    other = self.seen.get(key)
                    if other is not None and other != forward.name:
                        raise clash(f"forward {forward.name}", key, f"forward {other}")
                self.seen.update(dict.fromkeys(keys, forward.name))


async def resolve_once(forward: Forward, kube: object | None) -> EndpointSet:
    target = forward.target
    if isinstance(target, ServiceTarget):
        assert kube is not None
        result: EndpointSet = await kube.check_once(  # type: ignore[attr-defined]
            target, forward.options.mode, forward.protocols)
        return result
    assert isinstance(target, HostTarget)
    if target.is_ip:
        from portproxy.resolve.static import StaticResolver

        return StaticResolver(target)._snapshot
    try:
        addresses = await system_lookup(target.host)
    except OSError as exc:
        raise ResolveError(f"cannot resolve {target.host}: {exc}") from None
    from portproxy.endpoints import Endpoint

    return EndpointSet.of([Endpoint(a, target.port) for a in addresses])


def _mode(forward: Forward) -> str:
    if isinstance(forward.target, ServiceTarget):
        return forward.options.mode.value
    return "static" if forward.target.is_ip else "dns"


async def check_forward(forward: Forward, offline: bool, kube: object | None,
                        binds: BindTest) -> CheckRow:
    status, endpoints = "ok", "-" if offline else ""
    try:
        binds.bind(forward)
        if not offline:
            found = await resolve_once(forward, kube)
            endpoints = ", ".join(str(e) for e in found.endpoints) or "none"
            if not found:
                status = "no endpoints"
    except PortproxyError as exc:
        status = str(exc)
    protos = "+".join(p.value for p in forward.protocols)
    return CheckRow(forward.name, f"{protos} {forward.listen}", str(forward.target),
                    _mode(forward), endpoints or "-", status)


def render(rows: Sequence[CheckRow]) -> str:
    header = ("FORWARD", "LISTEN", "TARGET", "MODE", "ENDPOINTS", "STATUS")
    table = [header, *((r.forward, r.listen, r.target, r.mode, r.endpoints, r.status)
                       for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
             + "  " + row[-1] for row in table]
    return "\n".join(line.rstrip() for line in lines)
