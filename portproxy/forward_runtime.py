"""Everything running for one forward (target state, engines, interface binding, tasks),
the hand-over from a forward a reload replaced, and the status the admin endpoint shows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portproxy.endpoints import EndpointSet
from portproxy.spec import Forward, ServiceTarget
from portproxy.status import ForwardStatus
from portproxy.target import TargetState
from portproxy.tcp import TcpForwarder
from portproxy.udp import UdpForwarder

if TYPE_CHECKING:
    from portproxy.ifbind import InterfaceBinding

log = logging.getLogger("portproxy")

#: How long a replaced forward keeps accepting while its successor's target resolves.
HANDOVER_TIMEOUT = 30.0


@dataclass(eq=False)
class ForwardRuntime:
    """Everything running for one forward."""

    forward: Forward
    target: TargetState
    tcp: TcpForwarder | None = None
    udp: UdpForwarder | None = None
    binding: InterfaceBinding | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    detail: str = ""

    @property
    def engines(self) -> list[Any]:
        return [e for e in (self.tcp, self.udp) if e is not None]

    def stop_accepting(self) -> None:
        for engine in self.engines:
            engine.stop_accepting()

    async def drain(self, timeout: float) -> None:
        await asyncio.gather(*(engine.drain(timeout) for engine in self.engines))
        for task in self.tasks:
            task.cancel()

    def set_detail(self, detail: str) -> None:
        self.detail = detail


class Handover:
    """A forward a reload replaced keeps accepting until its successors (the new forwards
    bound to an address it is bound to: ``ListenClaims.sharing``) do.

    A new TCP listener listens only once its target has resolved (``add_listener``), so
    stopping the old forward at once would refuse clients, for as long as a DNS lookup or
    a first Kubernetes list takes, on a port that was serving them. ``retire`` is called
    once, when every successor's target has resolved, after ``timeout`` (a target that
    never resolves must not keep the old forward), or from ``finish`` (stopping).
    """

    def __init__(self, old: ForwardRuntime, successors: list[ForwardRuntime],
                 retire: Callable[[ForwardRuntime], None],
                 timeout: float = HANDOVER_TIMEOUT) -> None:
        self.old = old
        self.successors: list[ForwardRuntime] = []
        self._retire = retire
        self._timer = asyncio.get_running_loop().call_later(timeout, self._timed_out)
        self.done = False
        self._await(successors)
        log.info("forward %s replaced: accepting until its successor listens",
                 old.forward.name, extra={"forward": old.forward.name})

    def _await(self, successors: list[ForwardRuntime]) -> None:
        for successor in successors:
            if not successor.target.resolved:
                self.successors.append(successor)
                successor.target.on_change(self._on_change)

    def successor_replaced(self, successor: ForwardRuntime, by: list[ForwardRuntime]) -> None:
        """A later reload replaced ``successor`` (still unresolved) by ``by``, maybe none:
        those are awaited instead, or the old forward retires if nothing is left."""
        if successor not in self.successors:
            return
        self.successors.remove(successor)
        successor.target.off_change(self._on_change)
        self._await(by)
        self._on_change(EndpointSet())

    def _on_change(self, _endpoints: EndpointSet) -> None:
        if all(s.target.resolved for s in self.successors):
            self.finish()

    def _timed_out(self) -> None:
        log.warning("forward %s: its successor's target is still unresolved; stopping it "
                    "anyway", self.old.forward.name, extra={"forward": self.old.forward.name})
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self._timer.cancel()
        for successor in self.successors:
            successor.target.off_change(self._on_change)
        self._retire(self.old)


def status_of(forward: Forward, target: TargetState, engines: list[Any], detail: str
              ) -> ForwardStatus:
    bound = bool(engines) and all(engine.bound for engine in engines) and not detail
    if not detail and not target.resolved and target.problem:
        detail = f"target not resolved yet: {target.problem}"
    tcp = [e for e in engines if isinstance(e, TcpForwarder)]
    udp = [e for e in engines if not isinstance(e, TcpForwarder)]
    return ForwardStatus(
        name=forward.name,
        protocols=tuple(p.value for p in forward.protocols),
        listen=str(forward.listen),
        target=str(forward.target),
        mode=_target_mode(forward),
        endpoints=tuple(str(e) for e in target.endpoints.endpoints),
        bound=bound,
        resolved=target.resolved,
        active_connections=sum(e.active for e in tcp),
        udp_flows=sum(e.flows for e in udp),
        detail=detail,
    )


def _target_mode(forward: Forward) -> str:
    target = forward.target
    if isinstance(target, ServiceTarget):
        return forward.options.mode.value
    return "static" if target.is_ip else "dns"
