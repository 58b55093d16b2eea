"""EndpointSlice objects (``discovery.k8s.io/v1``, as JSON dicts) → ``EndpointSet``. Pure.

The rules follow kube-proxy's reading of the API so portproxy agrees with the cluster about
which pods take traffic:

- ``conditions.ready`` nil means true; ``serving`` nil means true; ``terminating`` nil means
  false (the API documents exactly these defaults).
- Ready endpoints are used. Only when *no* endpoint of the whole Service is ready, the ones
  that are serving *and* terminating are used instead, so a Service whose pods are all
  rolling out keeps answering until the new ones are ready (kube-proxy's
  ProxyTerminatingEndpoints behaviour).
- The port is matched by the Service port's *name* and *protocol* (as kube-proxy keys its
  rules), because an EndpointSlice's ports carry the service port name with the pod's target
  port number: that is how per-pod targetPorts (named container ports that differ between
  pods) work. An unnamed single-port Service has the name ``""`` on both sides (the API may
  also omit it or send null); an absent protocol is TCP, the API's default.
- Several slices per Service are normal (over 100 endpoints, or one per address family):
  the result is their union. ``endpoints: null`` is an empty slice. ``FQDN`` slices are
  ignored (deprecated; the addresses are not IPs).
- An endpoint's ``addresses`` are fungible (the API says consumers may use the first only);
  using just the first keeps one pod one endpoint, so balancing weights stay even.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from portproxy.endpoints import Endpoint, EndpointSet

JsonDict = Mapping[str, Any]


def _flag(conditions: JsonDict, key: str, default: bool) -> bool:
    value = conditions.get(key)
    return default if value is None else bool(value)


def _protocol(port: JsonDict) -> str:
    return str(port.get("protocol") or "TCP")


def _slice_port(slice_: JsonDict, port_name: str, protocol: str) -> int | None:
    """The port number this slice gives to the service port ``port_name`` of ``protocol``
    (None if absent)."""
    for port in slice_.get("ports") or ():
        if (port.get("name") or "") == port_name and _protocol(port) == protocol \
                and port.get("port") is not None:
            number = int(port["port"])
            return number if 1 <= number <= 65535 else None
    return None


def _address(slice_: JsonDict, endpoint: JsonDict) -> str | None:
    if slice_.get("addressType") not in ("IPv4", "IPv6"):
        return None
    for address in endpoint.get("addresses") or ():
        try:
            return str(ipaddress.ip_address(address))
        except ValueError:
            continue
    return None


@dataclass(frozen=True, slots=True)
class SliceEndpoints:
    """The endpoints of one slice for one port, split by how usable they are."""

    ready: tuple[Endpoint, ...] = ()
    serving_terminating: tuple[Endpoint, ...] = ()


def slice_endpoints(slice_: JsonDict, port_name: str, protocol: str = "TCP"
                    ) -> SliceEndpoints:
    """Read one EndpointSlice for the service port named ``port_name`` of ``protocol``."""
    port = _slice_port(slice_, port_name, protocol)
    if port is None:
        return SliceEndpoints()
    ready: list[Endpoint] = []
    fallback: list[Endpoint] = []
    for endpoint in slice_.get("endpoints") or ():
        host = _address(slice_, endpoint)
        if host is None:
            continue
        conditions = endpoint.get("conditions") or {}
        item = Endpoint(host, port, endpoint.get("nodeName") or None)
        if _flag(conditions, "ready", True):
            ready.append(item)
        elif _flag(conditions, "serving", True) and _flag(conditions, "terminating", False):
            fallback.append(item)
    return SliceEndpoints(tuple(ready), tuple(fallback))


def endpoints_from_slices(slices: Iterable[JsonDict], port_name: str | None,
                          protocol: str = "TCP") -> EndpointSet:
    """The union of every slice's usable endpoints for service port ``port_name`` of
    ``protocol`` ("TCP" or "UDP", the API's spelling).

    Ready endpoints when any exist across all slices, else serving-and-terminating ones.
    ``port_name`` None is the same as ``""`` (an unnamed port).
    """
    name = port_name or ""
    ready: list[Endpoint] = []
    fallback: list[Endpoint] = []
    for slice_ in slices:
        found = slice_endpoints(slice_, name, protocol)
        ready.extend(found.ready)
        fallback.extend(found.serving_terminating)
    return EndpointSet.of(ready if ready else fallback)


def service_port(service: JsonDict, port: int | str, protocol: str) -> JsonDict | None:
    """The Service's ``spec.ports`` entry for a requested number or name and ``protocol``
    ("TCP" or "UDP"); None if it has none.

    A number matches ``spec.ports[].port`` (the Service's port, not the targetPort). A name
    stands for its entry's number: ``kube-dns:dns`` (53/UDP) in a TCP forward is 53/TCP
    (``dns-tcp``), as a client reaching the Service's port 53 over TCP would get.
    """
    entries = [e for e in (service.get("spec") or {}).get("ports") or ()
               if e and e.get("port") is not None]
    if isinstance(port, str):
        named = next((e for e in entries if (e.get("name") or "") == port), None)
        if named is None or _protocol(named) == protocol:
            return named
        port = named.get("port")
    return next((e for e in entries if e.get("port") == port and _protocol(e) == protocol),
                None)


def describe_ports(service: JsonDict) -> str:
    """``http=80, metrics=9090`` — for error messages that list what the Service offers."""
    parts = []
    for entry in (service.get("spec") or {}).get("ports") or ():
        name = entry.get("name") or ""
        port = str(entry.get("port")) + ("" if _protocol(entry) == "TCP" else
                                         f"/{_protocol(entry)}")
        parts.append(f"{name}={port}" if name else port)
    return ", ".join(parts) or "none"
