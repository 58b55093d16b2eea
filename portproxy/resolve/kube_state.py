"""What one Service looks like from its watches, and what a forward makes of it. No I/O.

``ServiceView`` is the latest state of a Service and its EndpointSlices as the watches
published it; ``resolve_view`` turns it into an ``Outcome`` for one forward (its port and
mode). ``SharedService`` is the per-process, per-Service hub that every forward using the
Service reads from: one set of watches, any number of consumers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import Any

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.endpointslices import (
    JsonDict,
    describe_ports,
    endpoints_from_slices,
    service_port,
)
from portproxy.loop import wait_at_most
from portproxy.spec import HostTarget, Protocol, ServiceTarget, TargetMode

Obj = dict[str, Any]

log = logging.getLogger("portproxy.kube")


@dataclass(frozen=True, slots=True)
class ServiceView:
    """The Service and its slices as last listed/watched; ``*_synced`` once listed."""

    service_synced: bool = False
    service: Obj | None = None
    slices_synced: bool = False
    slices: tuple[Obj, ...] = ()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a forward should use now.

    ``endpoints`` None means "not resolved yet" (readiness waits); an empty set means the
    target resolved to nothing (new connections are refused at once). ``external`` asks the
    caller to resolve an ExternalName by DNS. ``problem`` is a line worth logging.
    """

    endpoints: EndpointSet | None = None
    problem: str | None = None
    external: HostTarget | None = None


def _spec(service: Obj) -> Obj:
    spec = service.get("spec") or {}
    return spec if isinstance(spec, dict) else {}


def _missing_port(target: ServiceTarget, service: Obj, protocol: str) -> Outcome:
    return Outcome(EndpointSet(), f"Service {target.namespace}/{target.name} has no "
                                  f"{protocol} port {target.port!r} "
                                  f"(ports: {describe_ports(service)})")


def _ports(target: ServiceTarget, service: Obj, protocols: tuple[Protocol, ...]
           ) -> dict[str, JsonDict] | Outcome:
    """The Service port entry for each of the forward's protocols (API spelling), or the
    Outcome saying which one it lacks. They share one number (see ``service_port``)."""
    found: dict[str, JsonDict] = {}
    for protocol in protocols:
        name = protocol.value.upper()
        entry = service_port(service, target.port, name)
        if entry is None:
            return _missing_port(target, service, name)
        found[name] = entry
    return found


def _external(target: ServiceTarget, service: Obj, protocols: tuple[Protocol, ...]
              ) -> Outcome:
    host = str(_spec(service).get("externalName") or "")
    if not host:
        return Outcome(EndpointSet(), f"Service {target.namespace}/{target.name} is "
                                      "ExternalName without an externalName")
    if isinstance(target.port, int):
        port = target.port
    else:  # its ports only name numbers: the protocol is the client's business
        entry = service_port(service, target.port, "TCP") or service_port(
            service, target.port, "UDP")
        if entry is None or entry.get("port") is None:
            return _missing_port(target, service, protocols[0].value.upper())
        port = int(entry["port"])
    return Outcome(external=HostTarget(host.rstrip("."), port))


def resolve_view(view: ServiceView, target: ServiceTarget, mode: TargetMode,
                 protocols: tuple[Protocol, ...] = (Protocol.TCP,)) -> Outcome:
    """The endpoints one forward (of ``protocols``) should use given the current view of
    its Service."""
    where = f"{target.namespace}/{target.name}"
    if not view.service_synced:
        return Outcome()
    service = view.service
    if service is None:
        return Outcome(EndpointSet(), f"Service {where} not found; new connections are "
                                      "refused until it exists (watching for it)")
    spec = _spec(service)
    if spec.get("type") == "ExternalName":
        return _external(target, service, protocols)
    ports = _ports(target, service, protocols)
    if isinstance(ports, Outcome):
        return ports
    if mode is TargetMode.CLUSTERIP:
        return _cluster_ip(target, service, ports)
    if not view.slices_synced:
        return Outcome()
    found = {protocol: endpoints_from_slices(view.slices, entry.get("name"), protocol)
             for protocol, entry in ports.items()}
    first = next(iter(found.values()))
    if any(endpoints != first for endpoints in found.values()):
        # One forward has one endpoint list for both protocols.
        return Outcome(EndpointSet(), f"Service {where} port {target.port!r} leads to other "
                                      "pod ports for TCP than for UDP; write a tcp:// and a "
                                      "udp:// forward instead of tcp+udp://")
    return Outcome(first)


def _cluster_ip(target: ServiceTarget, service: Obj, ports: dict[str, JsonDict]) -> Outcome:
    spec = _spec(service)
    where = f"{target.namespace}/{target.name}"
    ips = [ip for ip in (spec.get("clusterIPs") or [spec.get("clusterIP")]) if ip]
    if "None" in ips:
        return Outcome(EndpointSet(), f"Service {where} is headless (clusterIP: None), so "
                                      "it has no ClusterIP to forward to; use mode=endpoints")
    if not ips:
        return Outcome(EndpointSet(), f"Service {where} has no ClusterIP yet")
    port = int(next(iter(ports.values()))["port"])
    return Outcome(EndpointSet.of([Endpoint(ip, port) for ip in ips]))


@dataclass(frozen=True, slots=True)
class Problem:
    """Why a watch is failing, once per kind of failure: the line and its log level."""

    level: int
    line: str


@dataclass(eq=False)
class SharedService:
    """One Service's watches and latest view, shared by every forward that targets it.

    Lives on the event loop: watch threads hand updates over with ``call_soon_threadsafe``
    and ``update`` runs on the loop, so consumers need no locks.
    """

    namespace: str
    name: str
    view: ServiceView = field(default_factory=ServiceView)
    version: int = 0
    consumers: int = 0
    informers: dict[str, Any] = field(default_factory=dict)  # resource → Informer
    forwards: list[str] = field(default_factory=list)
    """Names of the forwards reading this Service (one entry per consumer), for messages."""
    problems: dict[str, str] = field(default_factory=dict)
    """Per watched resource, why its watch fails now (absent while it works)."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def update(self, **changes: Any) -> None:
        self.view = replace(self.view, **changes)
        self.version += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def report(self, resource: str, problem: Problem | None) -> None:
        """A watch of ``resource`` started failing (said once, naming the forwards affected)
        or works again (None)."""
        if problem is None:
            self.problems.pop(resource, None)
            return
        self.problems[resource] = problem.line
        names = sorted(set(self.forwards))
        if names:
            log.log(problem.level, "forward %s: %s", ", ".join(names), problem.line)
        else:
            log.log(problem.level, "%s", problem.line)

    @property
    def problem(self) -> str | None:
        """One failing watch's line, or None while every watch works."""
        return next(iter(self.problems.values()), None)

    async def wait_newer(self, version: int, timeout: float | None = None) -> None:
        """Return once ``self.version`` moved past ``version`` (or ``timeout`` passed)."""
        if self.version != version:
            return
        await wait_at_most(self._changed, timeout)
