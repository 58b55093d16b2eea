"""What each forward is doing right now, for /readyz, /forwards and ``portproxy check``.

Pure values: the engines (through the daemon) publish one ``ForwardStatus`` per forward and the
admin server only reads them, so the HTTP side never reaches into sockets or resolvers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ForwardStatus:
    """A snapshot of one forward."""

    name: str
    """The forward's label, as in logs and metrics."""
    protocols: tuple[str, ...]
    """``("tcp",)``, ``("udp",)`` or ``("tcp", "udp")``."""
    listen: str
    """The listen address as the user wrote it (``*:53``, ``eth0:80``, ``[::1]:8080``)."""
    target: str
    """The target as the user wrote it (``kube-system/kube-dns:dns``, ``10.0.0.10:53``)."""
    mode: str
    """``endpoints``/``clusterip`` for Service targets, ``static``/``dns`` for host targets."""
    endpoints: tuple[str, ...]
    """The endpoints currently in use, ``host:port`` each."""
    bound: bool
    """Every listener of this forward holds its socket."""
    resolved: bool
    """The target has been resolved at least once (an empty answer counts: it is an answer)."""
    active_connections: int
    """TCP connections open now."""
    udp_flows: int
    """UDP flows open now."""
    detail: str = ""
    """Why the forward is not ready, in words (``waiting for interface eth0``,
    ``target not resolved yet``, ``listener lost``); empty when there is nothing to add."""
    draining: bool = False
    """A forward a reload removed or replaced, finishing its connections and flows: listed
    so that they show, never a reason to be unready (its listeners are closed on purpose)."""

    @property
    def ready(self) -> bool:
        return self.bound and self.resolved

    def reason(self) -> str:
        """Why this forward is not ready; the publisher's ``detail`` wins over a generic one."""
        if self.detail:
            return self.detail
        if not self.bound:
            return "listener not bound"
        if not self.resolved:
            return "target not resolved yet"
        return ""

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict: every field, tuples as lists, plus the derived ``ready``."""
        data = asdict(self)
        data["protocols"] = list(self.protocols)
        data["endpoints"] = list(self.endpoints)
        data["ready"] = self.ready
        return data


class StatusSource(Protocol):
    """Anything that can list the current forward statuses (the daemon, a test double)."""

    def forward_statuses(self) -> Sequence[ForwardStatus]: ...

    def waiting_for(self) -> Sequence[str]:
        """What readiness waits for besides the forwards (a ConfigMap not read yet, whose
        entries are forwards to come), one line each; empty when nothing."""
        ...


def readiness(source: StatusSource) -> list[str]:
    """Why ``source`` is not ready, one line each (/readyz, the ready file); empty when it
    is ready."""
    return [*source.waiting_for(), *not_ready_lines(source.forward_statuses())]


def is_ready(statuses: Sequence[ForwardStatus]) -> bool:
    """Ready iff every forward is bound and resolved; no forwards at all is ready (nothing
    to wait for, e.g. ConfigMap mode before the first key)."""
    return all(status.ready or status.draining for status in statuses)


def not_ready_lines(statuses: Sequence[ForwardStatus]) -> list[str]:
    """One line per forward that is not ready, naming it and saying why."""
    return [
        f"forward {status.name} not ready: {status.reason()}"
        for status in statuses
        if not status.ready and not status.draining
    ]
