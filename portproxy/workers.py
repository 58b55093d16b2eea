"""``--workers N``: N processes share every listener through SO_REUSEPORT.

The supervisor (the process the user started) owns everything that must exist once per
node: the resolvers (so one Kubernetes watch per Service, whatever N), the admin endpoint,
a created VIP interface and the signals. Each worker runs the data plane (a ``Daemon`` with
its own listeners) and gets its settings and every endpoint change from the supervisor
over a socketpair; it reports readiness, then metric snapshots and statuses each second.
A worker that dies is restarted with the current settings and endpoints. SIGTERM drains
every worker; SIGHUP reloads the file once and sends the result to all.

The kernel keeps a UDP client on one worker: SO_REUSEPORT picks the socket by a hash of the
4-tuple, which only changes when a worker's socket joins or leaves the group (a restart).

This module is the supervisor; the worker's side is ``worker_process.py`` and the messages
between them are ``worker_link.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from portproxy.admin import AdminServer
from portproxy.config import Settings
from portproxy.configmap import ForwardSources, configmap_refs, configmaps_unread
from portproxy.configmap_watch import follow_configmap
from portproxy.daemon import Reloader, install_startup_signals, reloaded
from portproxy.endpoints import Balancer
from portproxy.errors import PortproxyError, SetupError
from portproxy.forward_runtime import status_of
from portproxy.metrics import ProxyMetrics, Registry
from portproxy.ready_file import ReadyFile
from portproxy.resolver_factory import Resolvers
from portproxy.spec import Forward, ServiceTarget
from portproxy.status import ForwardStatus
from portproxy.target import TargetState
from portproxy.worker_link import Link

log = logging.getLogger("portproxy.workers")

RESTART_DELAY = 1.0
"""Seconds before restarting a crashed worker, so a crash loop cannot spin."""


class WorkerHandle:
    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.link: Link | None = None
        self.stats: list[Any] = []
        self.statuses: list[ForwardStatus] = []
        self.started: asyncio.Future[str] | None = None
        self.applied: asyncio.Future[str | None] | None = None
        """Its answer to the reload on offer: "" applied, else why it refused; None if it
        exited first or is draining."""
        self.terminated = False
        """Sent SIGTERM by the supervisor: draining, and a second signal would reset all."""
        self.pid = 0
        self.last_report: float | None = None
        """When its last report came (monotonic), None until it runs: a worker whose event
        loop is stuck stops reporting, while the kernel keeps handing it clients."""


def verdict(answers: list[str | None]) -> str:
    """Why a reload with these worker answers ("" applied, text refused, None no answer:
    exited or draining) must not be adopted; "" when it is. One worker that applied it is
    enough (the others are then restarted with it): binding is the same in every worker
    but for races with address changes."""
    if "" in answers:
        return ""
    refusal = next((a for a in answers if a), None)
    if refusal is not None:
        return f"reload refused by the workers: {refusal}"
    # All exited or draining: nobody could tell whether it binds.
    return "reload not applied: no worker was running to apply it (send SIGHUP again)"


class MergedRegistry(Registry):
    """The supervisor's own metrics plus the sum of every worker's last report."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.supervisor = supervisor

    def render(self) -> str:
        merged = ProxyMetrics()
        merged.registry.add_snapshot(self.supervisor.metrics.registry.snapshot())
        merged.registry.add_snapshot(self.supervisor.retired.snapshot(), gauges=False)
        info = "portproxy_build_info"
        # Not summed: every worker has the same build, and learns the same endpoints from
        # the supervisor, whose own count is already in.
        same_in_every_worker = (info, "portproxy_endpoints")
        for worker in self.supervisor.workers:
            merged.registry.add_snapshot(worker.stats, skip=same_in_every_worker)
            for name, values, _ in worker.stats:
                if name == info:  # one series, not a sum
                    merged.build_info.labels(*values).set(1)
        return merged.registry.render()


class Supervisor:
    def __init__(self, settings: Settings, reloader: Reloader | None = None) -> None:
        self.settings = settings
        self.reloader = reloader
        self.metrics = ProxyMetrics()
        self.resolvers = Resolvers(settings, self.metrics)
        self.sources = ForwardSources(settings.forwards)
        self.targets: dict[Forward, TargetState] = {}
        self.workers = [WorkerHandle(i) for i in range(settings.workers)]
        self.retired = ProxyMetrics().registry
        """The counters of workers that exited, summed (so restarts never make a counter go
        backwards), one series each however often workers restart."""
        self.stopping = False
        self._stop = asyncio.Event()
        self._signals = 0
        self._group: asyncio.TaskGroup | None = None
        self._resolving: dict[Forward, asyncio.Task[None]] = {}
        self._watches: list[asyncio.Task[None]] = []
        self._reloading = asyncio.Lock()

    # -- targets --------------------------------------------------------------------------
    def _target(self, forward: Forward) -> TargetState:
        state = TargetState(forward.name, self.resolvers.for_forward(forward),
                            Balancer(forward.options.balance),
                            self.metrics.endpoints.labels(forward.name))
        state.on_change(lambda endpoints: self._broadcast("endpoints", forward, endpoints))
        return state

    def _broadcast(self, *message: object) -> None:
        assert self._group is not None
        for worker in self.workers:
            if worker.link is not None:
                self._group.create_task(self._send(worker, *message))

    async def _send(self, worker: WorkerHandle, *message: object) -> None:
        if worker.link is not None:
            with contextlib.suppress(OSError):
                await worker.link.send(*message)

    # -- workers --------------------------------------------------------------------------
    async def _spawn(self, worker: WorkerHandle) -> None:
        parent, child = socket.socketpair()
        try:
            worker.proc = subprocess.Popen(
                [sys.executable, "-m", "portproxy.worker_process", str(child.fileno()),
                 str(worker.index)],
                pass_fds=[child.fileno()], start_new_session=True)
        except OSError as exc:  # fork or exec refused: out of memory or processes, ...
            parent.close()
            raise SetupError(f"cannot start worker {worker.index}: {exc.strerror or exc}; "
                             "check the memory and process limits") from None
        finally:
            child.close()
        link = worker.link = Link(parent)
        worker.terminated = False
        worker.started = asyncio.get_running_loop().create_future()
        assert self._group is not None
        # The reader first: a worker that dies before reading its settings is then seen
        # to end (and is restarted) like any other, rather than failing these sends.
        self._group.create_task(self._listen(worker), name=f"worker {worker.index}")
        with contextlib.suppress(OSError):
            await link.send("settings", self.settings)
            for forward, state in self.targets.items():
                if state.resolved:
                    await link.send("endpoints", forward, state.endpoints)

    def unresponsive(self, threshold: float) -> str | None:
        """Why /healthz must fail for the workers: one that has not reported for more than
        ``threshold`` seconds (a stuck event loop: its clients hang, and only a restart of
        the pod helps), else None."""
        now = time.monotonic()
        for worker in self.workers:
            if worker.last_report is not None and now - worker.last_report > threshold:
                return (f"worker {worker.index} (pid {worker.pid}) unresponsive: last report "
                        f"{now - worker.last_report:.1f}s ago")
        return None

    async def _listen(self, worker: WorkerHandle) -> None:
        assert worker.link is not None and worker.started is not None
        try:
            while True:
                message = await worker.link.receive()
                if message[0] in ("ready", "stats"):
                    worker.last_report = time.monotonic()
                if message[0] == "ready" and not worker.started.done():
                    worker.pid = message[1]
                    worker.started.set_result("")
                    log.info("worker %d running (pid %d)", worker.index, message[1])
                elif message[0] == "failed" and not worker.started.done():
                    worker.started.set_result(message[1])
                elif message[0] == "stats":
                    worker.stats, worker.statuses = message[1], message[2]
                elif message[0] in ("applied", "draining") and worker.applied is not None \
                        and not worker.applied.done():
                    worker.applied.set_result(None if message[0] == "draining" else
                                              message[1] or "")
        except (EOFError, OSError, pickle.UnpicklingError):
            pass
        # The link is closed at once, not after the process is reaped: a reload offered in
        # between would wait for an answer that no reader is left to take, forever, and
        # every later reload would queue behind it.
        worker.link.sock.close()
        worker.link = None
        if not worker.started.done():
            worker.started.set_result("worker exited during start-up")
        if worker.applied is not None and not worker.applied.done():
            worker.applied.set_result(None)
        await self._reap(worker)

    async def _reap(self, worker: WorkerHandle) -> None:
        assert worker.proc is not None
        code = await asyncio.to_thread(worker.proc.wait)
        self.retired.add_snapshot(worker.stats, gauges=False)
        # A worker that died while draining a forward a reload removed reported it still:
        # that forward's series were forgotten at the reload and must not come back.
        self._forget_retired_removed()
        worker.stats, worker.statuses = [], []
        worker.last_report = None
        if self.stopping:
            return
        log.error("worker %d exited with %d; restarting in %.0fs", worker.index, code,
                  RESTART_DELAY)
        while True:
            await asyncio.sleep(RESTART_DELAY)
            if self.stopping:
                return
            try:
                await self._spawn(worker)
                return
            except SetupError as exc:  # the rest keeps serving; try again, never spin
                log.error("%s; retrying in %.0fs", exc, RESTART_DELAY)

    def _forget_retired_removed(self) -> None:
        """Dead workers' counters of forwards no longer configured leave /metrics."""
        current = {forward.name for forward in self.settings.forwards}
        for name in self.retired.label_values("forward") - current:
            self.retired.forget("forward", name)

    # -- status ---------------------------------------------------------------------------
    def waiting_for(self) -> list[str]:
        return configmaps_unread(self.settings, self.sources)

    def forward_statuses(self) -> list[ForwardStatus]:
        statuses = []
        for forward, state in self.targets.items():
            # Draining forwards (a reload replaced them) are listed apart, below.
            reports = [s for w in self.workers for s in w.statuses
                       if s.name == forward.name and not s.draining]
            mine = status_of(forward, state, [], "")
            everyone = len(reports) == len(self.workers)
            statuses.append(replace(
                mine,
                bound=everyone and all(s.bound for s in reports),
                # Resolved here is not enough: a worker listens once it has the endpoints
                # (sent over its link, reported back within a second).
                resolved=mine.resolved and everyone and all(s.resolved for s in reports),
                active_connections=sum(s.active_connections for s in reports),
                udp_flows=sum(s.udp_flows for s in reports),
                # A worker's own words (an interface it waits for), else the supervisor's
                # (it resolves the targets: why one does not resolve).
                detail=next((s.detail for s in reports if s.detail), mine.detail),
            ))
        return statuses + self._draining_statuses()

    def _draining_statuses(self) -> list[ForwardStatus]:
        """The workers' draining forwards, one entry per name and spec with the sum of
        their connections and flows (each worker drains its share)."""
        merged: dict[tuple[str, str, str], ForwardStatus] = {}
        for status in (s for w in self.workers for s in w.statuses if s.draining):
            key = (status.name, status.listen, status.target)
            seen = merged.get(key)
            merged[key] = status if seen is None else replace(
                seen, active_connections=seen.active_connections + status.active_connections,
                udp_flows=seen.udp_flows + status.udp_flows)
        return list(merged.values())

    # -- signals and reload ---------------------------------------------------------------
    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        self.stopping = True
        self._stop.set()
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None:
                if self._signals == 1 and worker.terminated:
                    continue  # draining already (restarted after a refused reload)
                worker.terminated = True
                worker.proc.send_signal(signal.SIGTERM if self._signals == 1 else
                                        signal.SIGINT)

    def _on_hup(self) -> None:
        running = self.sources.static
        new = reloaded(self.reloader, self.sources, self.settings)
        if new is not None:
            self._apply(new, running)

    def _apply(self, new: Settings, running: tuple[Forward, ...] | None = None) -> None:
        """Reload to ``new``; ``running``: the file forwards to go back to if it is
        refused (a SIGHUP's), so that the next ConfigMap change does not bring it back."""
        assert self._group is not None
        self._group.create_task(self._reload(new, running), name="reload")

    async def _reload(self, new: Settings, running: tuple[Forward, ...] | None = None
                      ) -> None:
        if not await self._offered_and_adopted(new) and running is not None:
            self.sources.set_static(running)

    async def _offered_and_adopted(self, new: Settings) -> bool:
        """Offer ``new`` to the workers and adopt it once they applied it: they bind, so
        only they know whether it can run (a port taken, an interface address another
        forward holds). A refused one leaves everything as it was, as without workers."""
        async with self._reloading:  # one reload at a time, in the order asked
            if self.stopping:  # the workers are draining and would ignore it too
                log.warning("stopping: configuration change ignored")
                return False
            added = [f for f in new.forwards if f not in self.targets]
            try:  # the first Service target, with a broken kubeconfig
                for forward in added:
                    if isinstance(forward.target, ServiceTarget):
                        self.resolvers.for_forward(forward)
            except PortproxyError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                return False
            new = replace(new, workers=len(self.workers))
            offered, answers = await self._offer(new)
            if self.stopping:  # SIGTERM came meanwhile
                log.warning("stopping: configuration change ignored")
                return False
            refusals = [(w, a) for w, a in answers if a]
            problem = verdict([a for _, a in answers])
            if problem:
                log.error("%s; keeping the running configuration", problem)
                return False
            self._adopt(new, added, offered)
            for worker, refusal in refusals:  # they run the old one: start them afresh
                if worker.terminated or worker.proc is None or worker.proc.poll() is not None:
                    continue
                log.error("worker %d refused the reload (%s) that the others applied; "
                          "restarting it", worker.index, refusal)
                worker.terminated = True
                worker.proc.send_signal(signal.SIGTERM)
            return True

    async def _offer(self, new: Settings
                     ) -> tuple[list[WorkerHandle], list[tuple[WorkerHandle, str | None]]]:
        """Send ``new`` to every worker: those offered it, and their answers (see
        ``WorkerHandle.applied``)."""
        loop = asyncio.get_running_loop()
        offered = [w for w in self.workers if w.link is not None]
        for worker in offered:
            worker.applied = loop.create_future()
        self._broadcast("settings", new)
        return offered, [(w, await w.applied) for w in offered if w.applied is not None]

    def _adopt(self, new: Settings, added: list[Forward], offered: list[WorkerHandle]
               ) -> None:
        """Resolve the added targets, forget removed ones, and send the workers endpoints."""
        self.settings = new
        for worker in self.workers:
            # Restarted during the offer with the settings of then: it gets these too.
            if worker.link is not None and worker not in offered:
                assert self._group is not None
                self._group.create_task(self._send(worker, "settings", new))
        names = {f.name for f in new.forwards}
        for forward in [f for f in self.targets if f not in new.forwards]:
            del self.targets[forward]
            self._resolving.pop(forward).cancel()
            if forward.name not in names:  # the workers forget theirs once drained
                self.metrics.registry.forget("forward", forward.name)
        # Dead workers' share of removed forwards goes now: while live workers drain one, its
        # counters may drop by that share (a reset, to Prometheus), then vanish.
        self._forget_retired_removed()
        for forward in added:
            self.targets[forward] = self._target(forward)
            self._follow(forward)
        for forward, state in self.targets.items():
            if state.resolved:
                self._broadcast("endpoints", forward, state.endpoints)
        log.info("configuration changed; the workers run the new forwards")

    # -- running --------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        # First: a stale file from a crashed start goes now.
        ready_file = ReadyFile.prepared(self.settings.ready_file, self)
        for forward in self.settings.forwards:
            self.targets[forward] = self._target(forward)
        if configmap_refs(self.settings):
            self.resolvers.kube()  # a bad kubeconfig fails the start here
        from portproxy.ifbind import vip_interface

        # From the start: the workers take about a second to start, and the default action
        # would end the supervisor alone, leaving a created interface behind.
        remove_signals = install_startup_signals(lambda: self._on_signal(signal.SIGTERM))
        try:
            # Before the workers start: their forwards listen on it. Removed after the last
            # worker has exited.
            with vip_interface(lambda: self.settings):
                await self._run(loop, ready_file)
        finally:
            remove_signals()
            if ready_file is not None:
                ready_file.withdraw()  # also when something failed: never ready once stopped

    async def _run(self, loop: asyncio.AbstractEventLoop, ready_file: ReadyFile | None
                   ) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            problem = ""
            for worker in self.workers:
                if self.stopping:  # a signal during start-up: start no more
                    break
                try:
                    await self._spawn(worker)
                except SetupError as exc:  # those started stop below, as on a failed start
                    problem = str(exc)
                    break
            failures = [await w.started for w in self.workers if w.started is not None]
            # Stopped by a signal, a worker ended during its start is no failure.
            signalled = self.stopping
            problem = "" if signalled else problem or next((f for f in failures if f), "")
            admin = None
            if problem:
                self._on_signal(signal.SIGTERM)
            elif not signalled:
                admin = await self._begin(loop)
            ready_task = None if ready_file is None or problem or signalled else \
                group.create_task(ready_file.run(), name="ready file")
            await self._stop.wait()
            if ready_file is not None:
                ready_file.withdraw()  # the probe says "not ready" as the workers drain
            if ready_task is not None:
                ready_task.cancel()
            await asyncio.gather(*(asyncio.to_thread(w.proc.wait) for w in self.workers
                                   if w.proc is not None))
            if admin is not None:
                await admin.stop()
            for task in [*self._resolving.values(), *self._watches]:
                task.cancel()
            await self.resolvers.close()
        if problem:
            raise SetupError(problem)
        log.info("all workers stopped")

    async def _begin(self, loop: asyncio.AbstractEventLoop) -> AdminServer | None:
        for forward in self.targets:
            self._follow(forward)
        admin = await self._start_admin()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        assert self._group is not None
        for ref in configmap_refs(self.settings):
            self._watches.append(self._group.create_task(follow_configmap(
                ref, self.resolvers.kube(), self.settings.forward_defaults, self.sources,
                lambda: self._apply(replace(self.settings, forwards=self.sources.desired()))),
                name=f"configmap {ref}"))
        log.info("supervising %d workers", len(self.workers))
        return admin

    def _follow(self, forward: Forward) -> None:
        assert self._group is not None
        self._resolving[forward] = self._group.create_task(
            self.targets[forward].follow(), name=f"resolve {forward.name}")

    async def _start_admin(self) -> AdminServer | None:
        address = self.settings.admin_address
        if address is None:
            return None
        admin = AdminServer(address[0], address[1], MergedRegistry(self), self,
                            liveness=self.unresponsive)
        await admin.start()
        log.info("admin endpoint on %s", admin.address)
        return admin

