"""Everything running for one forward (target state, engines, interface binding, tasks),
and the status the admin endpoint shows for it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from portproxy.spec import Forward, ServiceTarget
from portproxy.status import ForwardStatus
from portproxy.target import TargetState
from portproxy.tcp import TcpForwarder
from portproxy.udp import UdpForwarder

if TYPE_CHECKING:
    from portproxy.ifbind import InterfaceBinding


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


def status_of(forward: Forward, target: TargetState, engines: list[Any], detail: str
              ) -> ForwardStatus:
    tcp = [e for e in engines if isinstance(e, TcpForwarder)]
    udp = [e for e in engines if not isinstance(e, TcpForwarder)]
    return ForwardStatus(
        name=forward.name,
        protocols=tuple(p.value for p in forward.protocols),
        listen=str(forward.listen),
        target=str(forward.target),
        mode=_target_mode(forward),
        endpoints=tuple(str(e) for e in target.endpoints.endpoints),
        bound=bool(engines) and all(engine.bound for engine in engines) and not detail,
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
