"""ingress-nginx's tcp-services / udp-services ConfigMap format, as forward specs. Pure.

Each key is a port, each value ``NAMESPACE/NAME:PORT[:DECODE][:ENCODE]`` where the optional
fields are ``PROXY`` or empty: the first asks to *accept* a PROXY header from clients
(decode, not supported by portproxy: such a key is rejected with a message saying so), the
second to *send* one to the backend (encode: ``proxy-protocol=v1``, ingress-nginx's
format).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from portproxy.errors import ConfigError
from portproxy.spec import Forward, ForwardOptions, Protocol, parse_forward
from portproxy.spec_values import is_decimal

_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a DNS label
_OBJECT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # a DNS subdomain


@dataclass(frozen=True, slots=True)
class ConfigMapRef:
    namespace: str
    name: str
    protocol: Protocol

    def __str__(self) -> str:
        return f"{self.protocol.value}-services {self.namespace}/{self.name}"


def configmaps_unread(settings: Any, sources: ForwardSources) -> list[str]:
    """Readiness lines for the ConfigMaps not read yet: their entries are forwards still to
    come, so an instance without them is not ready (it would serve nothing)."""
    return [f"{ref}: not read yet" for ref in configmap_refs(settings)
            if ref not in sources.dynamic]


def configmap_refs(settings: Any) -> list[ConfigMapRef]:
    """The ConfigMaps named by ``--tcp-services-configmap``/``--udp-services-configmap``."""
    refs = []
    for text, protocol, flag in (
            (settings.tcp_services_configmap, Protocol.TCP, "--tcp-services-configmap"),
            (settings.udp_services_configmap, Protocol.UDP, "--udp-services-configmap")):
        if text:
            refs.append(parse_ref(text, protocol, flag))
    return refs


def parse_ref(text: str, protocol: Protocol, flag: str) -> ConfigMapRef:
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise ConfigError(f"invalid {flag} {text!r}: expected NAMESPACE/NAME")
    # As the API validates them: a typo is exit 2 now, not a watch failing for good later.
    if not _NAMESPACE.match(namespace):
        raise ConfigError(f"invalid {flag} {text!r}: namespace {namespace!r} is not a valid "
                          "Kubernetes namespace name (lowercase letters, digits and '-')")
    if len(name) > 253 or not _OBJECT_NAME.match(name):
        raise ConfigError(f"invalid {flag} {text!r}: {name!r} is not a valid ConfigMap name "
                          "(lowercase letters, digits, '-' and '.')")
    return ConfigMapRef(namespace, name, protocol)


def entry_spec(ref: ConfigMapRef, port: str, value: str) -> str:
    """One ConfigMap entry as a forward spec; ConfigError says what is wrong with it."""
    where = f"{ref} key {port!r}"
    if not is_decimal(port):
        raise ConfigError(f"{where}: the key must be a port number")
    target, _, rest = value.strip().partition(":")
    service_port, _, flags = rest.partition(":")
    decode, _, encode = flags.partition(":")
    if "/" not in target or not service_port:
        raise ConfigError(f"{where}: value {value!r} is not NAMESPACE/NAME:PORT[:PROXY[:PROXY]]")
    for field in (decode, encode):
        if field not in ("", "PROXY"):
            raise ConfigError(f"{where}: {field!r} is not PROXY or empty")
    if decode == "PROXY":
        raise ConfigError(f"{where}: decoding a PROXY header from clients is not supported by "
                          "portproxy (only sending one to the backend: the second field)")
    if encode == "PROXY" and ref.protocol is Protocol.UDP:
        raise ConfigError(f"{where}: ingress-nginx's PROXY field means v1, which is TCP only")
    spec = f"{ref.protocol.value}://:{port}={target}:{service_port}"
    if encode == "PROXY":
        spec += ",proxy-protocol=v1"
    return spec + f",name={ref.protocol.value}-services/{port}"


def configmap_forwards(ref: ConfigMapRef, data: Mapping[str, str], defaults: ForwardOptions
                       ) -> tuple[list[Forward], list[str]]:
    """Forwards for every valid entry, and one message per invalid entry (skipped)."""
    forwards: list[Forward] = []
    problems: list[str] = []
    for port, value in sorted(data.items()):
        try:
            forwards.append(parse_forward(entry_spec(ref, port, value), defaults))
        except ConfigError as exc:
            problems.append(str(exc))
    return forwards, problems


class ForwardSources:
    """The forwards to run: the static ones (flags, file) plus each ConfigMap's entries.

    A ConfigMap entry whose port a static forward (or the other ConfigMap) already uses is
    skipped with a message: two forwards on one port would share it through SO_REUSEPORT.
    """

    def __init__(self, static: tuple[Forward, ...]) -> None:
        self.static = static
        self.dynamic: dict[ConfigMapRef, tuple[Forward, ...]] = {}
        self._offered: dict[ConfigMapRef, list[Forward]] = {}
        """Each ConfigMap's entries before the checks, to check again when ``static``
        changes."""

    def desired(self) -> tuple[Forward, ...]:
        return self.static + tuple(f for forwards in self.dynamic.values() for f in forwards)

    def set_static(self, static: tuple[Forward, ...]) -> list[str]:
        """New static forwards (a reload): the ConfigMap entries are checked against them
        again, as at start; the problems, one line each."""
        self.static = static
        problems: list[str] = []
        for ref, forwards in list(self._offered.items()):
            problems += self.set_dynamic(ref, forwards)
        return problems

    def set_dynamic(self, ref: ConfigMapRef, forwards: list[Forward]) -> list[str]:
        self._offered[ref] = list(forwards)
        taken = {_port_key(f, p) for f in self.static for p in f.protocols}
        names = {f.name for f in self.static}
        for other, entries in self.dynamic.items():
            if other != ref:
                taken |= {_port_key(f, p) for f in entries for p in f.protocols}
        accepted, problems = [], []
        for forward in forwards:
            if forward.name in names:  # a --forward name=: their series would merge
                problems.append(f"{ref} key '{forward.listen.port}': the forward name "
                                f"{forward.name!r} is already used by another forward; "
                                "entry skipped")
                continue
            keys = {_port_key(forward, p) for p in forward.protocols}
            clash = [k for k in keys if k in taken or (k[0], "", k[2]) in taken
                     or (forward.listen.host == "" and any(t[0] == k[0] and t[2] == k[2]
                                                           for t in taken))]
            if clash:
                problems.append(f"{ref} key '{forward.listen.port}': port {forward.listen.port} "
                                "is already used by another forward; entry skipped")
                continue
            accepted.append(forward)
        self.dynamic[ref] = tuple(accepted)
        return problems


def _port_key(forward: Forward, protocol: Protocol) -> tuple[str, str, int]:
    return (protocol.value, forward.listen.host, forward.listen.port)
