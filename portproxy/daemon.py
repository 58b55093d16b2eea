"""Composition root: settings → resolvers, engines and admin in one task group; signals.

Each forward gets a ``ForwardRuntime``: its target state (one resolver task) and its TCP
and/or UDP engine. Reload (SIGHUP) diffs the new forwards against the running ones: an
unchanged forward keeps its listeners and connections; a removed one stops accepting and
drains in the background; a new one is bound and started.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import replace

from portproxy.admin import AdminServer
from portproxy.config import Settings, keep_restart_only
from portproxy.configmap import ForwardSources, configmap_refs, configmaps_unread
from portproxy.configmap_watch import follow_configmap
from portproxy.connect import Address
from portproxy.endpoints import Balancer
from portproxy.errors import PortproxyError
from portproxy.forward_runtime import ForwardRuntime, Handover, status_of
from portproxy.limits import SharedLimit
from portproxy.listen_claims import ListenClaims
from portproxy.logs import AccessLog, AccessRecord, format_address
from portproxy.metrics import ProxyMetrics
from portproxy.proxyproto import encode_header
from portproxy.ready_file import ReadyFile
from portproxy.relay import direction_type
from portproxy.resolver_factory import ResolverFactory, Resolvers
from portproxy.spec import Forward, HostTarget, Protocol
from portproxy.spec_values import format_seconds
from portproxy.splice import splice_available
from portproxy.status import ForwardStatus
from portproxy.target import TargetState
from portproxy.tcp import ProxyHeader, TcpForwarder
from portproxy.udp import UdpForwarder

log = logging.getLogger("portproxy")

Reloader = Callable[[], Settings]


def choose_pump(use_splice: bool) -> str:
    if not use_splice:
        return "copy"
    ok, reason = splice_available()
    if not ok:
        log.warning("zero-copy pump unavailable (%s); using the copy pump", reason)
    return "splice" if ok else "copy"


def install_startup_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """SIGTERM/SIGINT call ``stop`` and SIGHUP is ignored, until the running handlers
    replace them; returns what removes them."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
        "SIGHUP during start-up ignored: send it again once running"))

    def remove() -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return remove


def reloaded(reloader: Reloader | None, sources: ForwardSources,
             running: Settings) -> Settings | None:
    """The configuration read again (SIGHUP) plus the ConfigMap forwards, or None when the
    file is broken or there is none (said in the log; the running configuration stays).
    Settings only read at start keep their ``running`` values, and a change to them is
    logged."""
    if reloader is None:
        # Handled rather than left to the default action, which ends the process at once:
        # a habitual `kill -HUP` must not cut every connection.
        log.warning("SIGHUP ignored: the forwards come from flags, with nothing to re-read "
                    "(reloading needs --config FILE)")
        return None
    try:
        new = reloader()
    except PortproxyError as exc:
        log.error("reload rejected, keeping the running configuration: %s", exc)
        return None
    new, ignored = keep_restart_only(running, new)
    if ignored:
        log.warning("reload: %s changed, which takes effect only at a restart; the running "
                    "value%s kept", ", ".join(ignored), " is" if len(ignored) == 1 else "s are")
    if new.forward_defaults != running.forward_defaults and configmap_refs(running):
        log.warning("reload: the option defaults changed: the file's forwards take them, the "
                    "ConfigMap entries keep those of the start until a restart")
    for problem in sources.set_static(new.forwards):
        log.error("reload: %s", problem)
    return replace(new, forwards=sources.desired())


class Daemon:
    def __init__(self, settings: Settings, metrics: ProxyMetrics | None = None,
                 reloader: Reloader | None = None,
                 resolver_factory: ResolverFactory | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or ProxyMetrics()
        self.reloader = reloader
        self.pump = choose_pump(settings.use_splice)
        self.metrics.set_build(self.pump)
        self.direction_type = direction_type(self.pump == "splice")
        self.global_limit = SharedLimit(settings.max_conns)
        self.claims = ListenClaims()
        """Which forward holds each bound address (two may not, SO_REUSEPORT or not)."""
        self.access_log = AccessLog(settings.access_log)
        self.forwards: dict[Forward, ForwardRuntime] = {}
        self.admin: AdminServer | None = None
        self._group: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._signals = 0
        self.resolvers = Resolvers(settings, self.metrics)
        self.sources = ForwardSources(settings.forwards)
        self.resolver_factory = resolver_factory or self.resolvers.for_forward
        self._handovers: dict[ForwardRuntime, Handover] = {}
        """Forwards a reload replaced, accepting until their successors listen."""
        self._draining: dict[asyncio.Task[None], ForwardRuntime] = {}
        """Forwards a reload removed, finishing their connections in the background."""

    # -- building -------------------------------------------------------------------------
    def _tcp_access(self, forward: str, client: Address, endpoint: str, up: int, down: int,
                    duration: float, result: str) -> None:
        self.access_log.record(AccessRecord("tcp", forward, format_address(client), endpoint,
                                            up, down, duration, result))

    def _udp_access(self, forward: str, client: Address, endpoint: str, up: int, down: int,
                    duration: float, result: str) -> None:
        self.access_log.record(AccessRecord("udp", forward, format_address(client), endpoint,
                                            up, down, duration, result))

    def build(self, forward: Forward) -> ForwardRuntime:
        """Create and bind everything for ``forward`` (raises SetupError on bind failure)."""
        balancer = Balancer(forward.options.balance, self.settings.node_name)
        target = TargetState(forward.name, self.resolver_factory(forward), balancer,
                             self.metrics.endpoints.labels(forward.name))
        runtime = ForwardRuntime(forward, target)
        access = self.access_log.enabled
        try:
            if Protocol.TCP in forward.protocols:
                runtime.tcp = TcpForwarder(
                    forward, target, self.metrics, self.direction_type, self.global_limit,
                    self._tcp_access if access else None, _proxy_header(forward), self.claims)
            if Protocol.UDP in forward.protocols:
                runtime.udp = UdpForwarder(forward, target, self.metrics,
                                           self._udp_access if access else None, self.claims)
            self._bind(runtime)
        except BaseException:
            runtime.stop_accepting()
            raise
        return runtime

    def _bind(self, runtime: ForwardRuntime) -> None:
        forward = runtime.forward
        listen = forward.listen
        if listen.kind == "interface":
            # Imported here: pyroute2 takes ~0.5 s to import; only interface forwards need it.
            from portproxy.ifbind import InterfaceBinding

            target = forward.target
            itself = (target.host, target.port) if isinstance(target, HostTarget) and \
                target.is_ip else None
            runtime.binding = InterfaceBinding(forward.name, listen, runtime.engines,
                                               forward.options.wait_interface,
                                               runtime.set_detail, itself=itself)
            runtime.binding.bind_now()
            return
        for engine in runtime.engines:
            engine.add_listener(listen.host, freebind=forward.options.freebind)

    def start(self, runtime: ForwardRuntime) -> None:
        assert self._group is not None
        name = runtime.forward.name
        runtime.tasks.append(self._group.create_task(runtime.target.follow(),
                                                     name=f"resolve {name}"))
        if runtime.binding is not None:
            runtime.tasks.append(self._group.create_task(runtime.binding.follow(),
                                                         name=f"interface {name}"))
        self.forwards[runtime.forward] = runtime

    # -- status (admin) -------------------------------------------------------------------
    def waiting_for(self) -> list[str]:
        return configmaps_unread(self.settings, self.sources)

    def forward_statuses(self) -> list[ForwardStatus]:
        running = [status_of(r.forward, r.target, r.engines, r.detail)
                   for r in self.forwards.values()]
        # Replaced or removed by a reload, still serving what they had (and, handing over,
        # new clients until their successors listen).
        leaving = [replace(status_of(r.forward, r.target, r.engines, r.detail), draining=True)
                   for r in [*self._handovers, *self._draining.values()]]
        return running + leaving

    # -- signals --------------------------------------------------------------------------
    def request_stop(self) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("stopping: no new connections; draining for up to %ss "
                     "(signal again to stop at once)",
                     format_seconds(self.settings.drain_timeout))
            self._stop.set()
        else:
            log.warning("second signal: closing every connection now")
            for runtime in [*self.forwards.values(), *self._draining.values()]:
                for engine in runtime.engines:
                    engine.abort_all()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def install_signals(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()
        handled = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

        def remove() -> None:
            for sig in handled:
                loop.remove_signal_handler(sig)
        return remove

    # -- reload ---------------------------------------------------------------------------
    def request_reload(self) -> None:
        running = self.sources.static
        new = reloaded(self.reloader, self.sources, self.settings)
        if new is not None and self.apply(new) is not None:
            # Refused: the running file forwards stay, also for the next ConfigMap change.
            self.sources.set_static(running)

    def _apply_sources(self) -> None:
        self.apply(replace(self.settings, forwards=self.sources.desired()))

    def apply(self, new: Settings) -> str | None:
        """Move to ``new`` forwards without touching unchanged ones; returns why ``new`` was
        refused (the running configuration stays), or None once it is applied.

        New listeners are bound before removed ones close: SO_REUSEPORT lets a changed forward
        bind its port beside the old listener, and the old one keeps accepting until the new
        one listens (``Handover``), so the port never refuses a client.
        """
        if self.stopping:
            # Draining is final: a forward opened now would accept clients after "no new
            # connections", and keep the process alive past its drain.
            log.warning("stopping: configuration change ignored")
            return "stopping"
        wanted = set(new.forwards)
        removed = [r for f, r in self.forwards.items() if f not in wanted]
        added = [f for f in new.forwards if f not in self.forwards]
        started: list[ForwardRuntime] = []
        leaving = {e for r in removed for e in r.engines} - self.claims.retiring
        self.claims.retiring |= leaving  # their successors may bind beside them
        try:
            for forward in added:
                started.append(self.build(forward))
        except PortproxyError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            for runtime in started:
                runtime.stop_accepting()
            self.claims.retiring -= leaving
            for forward in added:  # built far enough to have series, never to run
                self._forget_series(forward.name)
            return str(exc)
        for runtime in started:
            self.start(runtime)
        old, self.settings = self.settings, new  # removed forwards drain by the new timeout
        for runtime in removed:
            del self.forwards[runtime.forward]
            sharing = set().union(*(self.claims.sharing(e) for e in runtime.engines))
            successors = [r for r in started if any(e in sharing for e in r.engines)]
            # A forward an earlier reload replaced may still wait for this one to listen:
            # it now waits for this one's successors (or none) instead.
            for handover in list(self._handovers.values()):
                handover.successor_replaced(runtime, successors)
            self._replace(runtime, successors)
        if new.max_conns != old.max_conns:
            self.global_limit.set_limit(new.max_conns)
            log.info("global --max-conns now %s", new.max_conns or "unlimited")
        log.info("reloaded: %d unchanged, %d added, %d removed",
                 len(self.forwards) - len(started), len(started), len(removed))
        return None

    def _replace(self, old: ForwardRuntime, successors: list[ForwardRuntime]) -> None:
        if old.udp is not None:  # new clients it receives while it drains go to them
            old.udp.successors = [s.udp for s in successors if s.udp is not None]
            for successor in old.udp.successors:  # and the other way until they resolve
                if not successor.target.resolved:
                    successor.predecessors.append(old.udp)
        if all(s.target.resolved for s in successors):
            self._drain_in_background(old)
            return

        def retire(runtime: ForwardRuntime) -> None:
            del self._handovers[runtime]
            self._drain_in_background(runtime)
        self._handovers[old] = Handover(old, successors, retire)

    def _drain_in_background(self, runtime: ForwardRuntime) -> None:
        assert self._group is not None
        runtime.stop_accepting()
        name = runtime.forward.name
        log.info("forward %s removed: draining", name, extra={"forward": name})
        task = self._group.create_task(runtime.drain(self.settings.drain_timeout),
                                       name=f"drain {name}")
        self._draining[task] = runtime
        task.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Task[None]) -> None:
        runtime = self._draining.pop(task)
        for engine in runtime.engines:
            self.claims.retired(engine)
        self._forget_series(runtime.forward.name)

    def _forget_series(self, name: str) -> None:
        """Drop forward ``name``'s metric series unless a running or draining forward has
        that name (a changed forward keeps its name, and its series). A removed forward's
        series end with it, as a scrape target's do; otherwise every ConfigMap entry ever
        seen would be exported for good."""
        in_use = {r.forward.name for r in (*self.forwards.values(), *self._draining.values(),
                                           *self._handovers)}
        if name not in in_use:
            self.metrics.registry.forget("forward", name)

    # -- running --------------------------------------------------------------------------
    async def run(self, ready: Callable[[], None] | None = None) -> None:
        from portproxy.ifbind import vip_interface

        # Handled from the very start: the default action would end the process at once,
        # leaving a created interface behind (install_signals takes over once running).
        remove_signals = install_startup_signals(self.request_stop)
        try:
            with vip_interface(lambda: self.settings):
                await self._run(ready)
        finally:
            remove_signals()

    async def _run(self, ready: Callable[[], None] | None) -> None:
        runtimes: list[ForwardRuntime] = []
        # First: a stale file from a crashed start goes now.
        ready_file = ReadyFile.prepared(self.settings.ready_file, self)
        try:
            for forward in self.settings.forwards:
                runtimes.append(self.build(forward))
            refs = configmap_refs(self.settings)
            kube = self.resolvers.kube() if refs else None  # a bad kubeconfig fails here
            await self._start_admin()
        except BaseException:
            for runtime in runtimes:
                runtime.stop_accepting()
            await self.close_resolvers()
            raise
        log.info("portproxy running %d forward(s) with the %s pump", len(runtimes), self.pump)
        _note_migrate_req()
        remove_signals = self.install_signals()
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for runtime in runtimes:
                    self.start(runtime)
                watches = [group.create_task(follow_configmap(
                    ref, kube, self.settings.forward_defaults,
                    self.sources, self._apply_sources), name=f"configmap {ref}")
                    for ref in refs]
                if ready_file is not None:
                    watches.append(group.create_task(ready_file.run(), name="ready file"))
                if ready is not None:
                    ready()
                await self._stop.wait()
                if ready_file is not None:
                    ready_file.withdraw()  # the probe says "not ready" as draining starts
                for watch in watches:  # no forward may open while draining
                    watch.cancel()
                await self.drain()
        finally:
            remove_signals()
            if ready_file is not None:
                ready_file.withdraw()  # also when something failed: never ready once stopped
            if self.admin is not None:
                await self.admin.stop()
            await self.close_resolvers()
        log.info("stopped")

    async def _start_admin(self) -> None:
        address = self.settings.admin_address
        if address is None:
            return
        admin = self.admin = AdminServer(address[0], address[1], self.metrics.registry, self)
        # Its socket has SO_REUSEPORT too (the next pod of a rollout binds it), so a forward
        # on its address would split its clients with it: refused like two forwards.
        await admin.start(lambda sock: self.claims.claim(sock, admin, "admin",
                                                         "the admin endpoint"))
        log.info("admin endpoint on %s (/metrics /healthz /readyz /forwards)",
                 self.admin.address)

    async def drain(self) -> None:
        for handover in list(self._handovers.values()):
            handover.finish()  # into self._draining, gathered below
        runtimes = list(self.forwards.values())
        for runtime in runtimes:
            runtime.stop_accepting()
        everyone = [*runtimes, *self._draining.values()]  # with those a reload removed
        serving = {r.udp for r in runtimes if r.udp is not None}
        for runtime in everyone:
            # Not those a reload removed (their clients were turned away already), even if
            # an earlier reload had made them a successor.
            if runtime.udp is not None and (runtime in runtimes
                                            or runtime.udp.has_successor_in(serving)):
                runtime.udp.serve_while_stopping()
        active = sum(r.tcp.active for r in everyone if r.tcp is not None)
        flows = sum(r.udp.flows for r in everyone if r.udp is not None)
        log.info("draining %d open connection(s) and %d UDP flow(s)", active, flows)
        await asyncio.gather(*(r.drain(self.settings.drain_timeout) for r in runtimes),
                             *self._draining)
        log.info("drain finished")

    async def close_resolvers(self) -> None:
        await self.resolvers.close()


def _proxy_header(forward: Forward) -> ProxyHeader | None:
    version = forward.options.proxy_protocol
    if version is None:
        return None

    def header(client: Address, local: Address) -> bytes:
        return encode_header(version.value, client, local, "stream")
    return header


MIGRATE_REQ = "/proc/sys/net/ipv4/tcp_migrate_req"


def _note_migrate_req() -> None:
    """Say once whether a rollout beside another instance can be loss-free on this node."""
    try:
        with open(MIGRATE_REQ) as sysctl:
            enabled = sysctl.read().strip() == "1"
    except OSError:
        return  # kernel older than 5.14, or no /proc: nothing to say
    if not enabled:
        log.info("net.ipv4.tcp_migrate_req=0: when this instance stops beside a new one "
                 "(rolling update), a handshake that completes in the last microseconds "
                 "before its listener closes is reset; set it to 1 on the node for loss-free "
                 "hand-overs")
