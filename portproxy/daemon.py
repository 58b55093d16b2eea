"""Composition root: settings → resolvers, engines and admin in one task group; signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from portproxy.config import Settings
from portproxy.endpoints import Balancer
from portproxy.errors import SetupError
from portproxy.limits import SharedLimit
from portproxy.metrics import ProxyMetrics
from portproxy.relay import direction_type
from portproxy.resolve import Resolver
from portproxy.resolve.dns import DnsResolver
from portproxy.resolve.static import StaticResolver
from portproxy.spec import Forward, HostTarget, Protocol, ServiceTarget
from portproxy.splice import splice_available
from portproxy.target import TargetState
from portproxy.tcp import TcpForwarder

log = logging.getLogger("portproxy")


@dataclass
class ForwardRuntime:
    """Everything running for one forward."""

    forward: Forward
    target: TargetState
    tcp: TcpForwarder | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def choose_pump(use_splice: bool) -> str:
    if not use_splice:
        return "copy"
    ok, reason = splice_available()
    if not ok:
        log.warning("zero-copy pump unavailable (%s); using the copy pump", reason)
    return "splice" if ok else "copy"


class Daemon:
    def __init__(self, settings: Settings, metrics: ProxyMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ProxyMetrics()
        self.pump = choose_pump(settings.use_splice)
        self.metrics.set_build(self.pump)
        self.direction_type = direction_type(self.pump == "splice")
        self.global_limit = SharedLimit(settings.max_conns)
        self.forwards: dict[str, ForwardRuntime] = {}
        self._stop = asyncio.Event()
        self._signals = 0
        self._kube: Any = None

    # -- building -------------------------------------------------------------------------
    def _resolver(self, forward: Forward) -> Resolver:
        target = forward.target
        if isinstance(target, ServiceTarget):
            resolver: Resolver = self._kube_resolvers().resolver(target, forward.options.mode)
            return resolver
        assert isinstance(target, HostTarget)
        return StaticResolver(target) if target.is_ip else DnsResolver(target)

    def _kube_resolvers(self) -> Any:
        # Imported on first use: processes without Service targets never load the client.
        from portproxy.resolve.kubernetes import KubeResolvers, KubeSettings  # type: ignore

        if self._kube is None:
            self._kube = KubeResolvers(
                KubeSettings(kubeconfig=self.settings.kubeconfig,
                             context=self.settings.kube_context,
                             node_name=self.settings.node_name),
                self.metrics)
        return self._kube

    def build(self, forward: Forward) -> ForwardRuntime:
        """Create and bind everything for ``forward`` (raises SetupError on bind failure)."""
        balancer = Balancer(forward.options.balance, self.settings.node_name)
        target = TargetState(forward.name, self._resolver(forward), balancer,
                             self.metrics.endpoints.labels(forward.name))
        runtime = ForwardRuntime(forward, target)
        if Protocol.TCP in forward.protocols:
            runtime.tcp = TcpForwarder(forward, target, self.metrics, self.direction_type,
                                       self.global_limit)
            listen = forward.listen
            if listen.kind == "interface":
                raise SetupError(f"forward {forward.name}: interface listen addresses are not "
                                 "supported yet")
            runtime.tcp.add_listener(listen.host)
        if Protocol.UDP in forward.protocols:
            raise SetupError(f"forward {forward.name}: UDP forwarding is not supported yet")
        return runtime

    def start(self, runtime: ForwardRuntime, group: asyncio.TaskGroup) -> None:
        name = runtime.forward.name
        runtime.tasks.append(group.create_task(runtime.target.follow(),
                                               name=f"resolve {name}"))
        self.forwards[name] = runtime

    # -- running --------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping: no new connections; draining for up to %.0fs "
                     "(signal again to stop at once)", self.settings.drain_timeout)
            self._stop.set()
        else:
            log.warning("second signal: closing every connection now")
            for runtime in self.forwards.values():
                if runtime.tcp is not None:
                    runtime.tcp.abort_all()

    def install_signals(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)

        def remove() -> None:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return remove

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        runtimes: list[ForwardRuntime] = []
        try:
            for forward in self.settings.forwards:
                runtimes.append(self.build(forward))
        except BaseException:
            for runtime in runtimes:
                if runtime.tcp is not None:
                    runtime.tcp.stop_accepting()
            raise
        log.info("portproxy running %d forward(s) with the %s pump", len(runtimes), self.pump)
        remove_signals = self.install_signals()
        try:
            async with asyncio.TaskGroup() as group:
                for runtime in runtimes:
                    self.start(runtime, group)
                if ready is not None:
                    ready()
                await self._stop.wait()
                await self.drain()
                for runtime in self.forwards.values():
                    for task in runtime.tasks:
                        task.cancel()
        finally:
            remove_signals()
            await self.close_resolvers()
        log.info("stopped")

    async def drain(self) -> None:
        engines = [r.tcp for r in self.forwards.values() if r.tcp is not None]
        for engine in engines:
            engine.stop_accepting()
        active = sum(e.active for e in engines)
        log.info("draining %d open connection(s)", active)
        await asyncio.gather(*(e.drain(self.settings.drain_timeout) for e in engines))
        log.info("drain finished")

    async def close_resolvers(self) -> None:
        if self._kube is not None:
            with contextlib.suppress(Exception):
                await self._kube.close()
