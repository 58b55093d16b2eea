"""One forward's view of a Kubernetes Service: the ``Resolver`` the daemon consumes.

Reads the per-Service ``SharedService`` (fed by the watch threads) and turns each change
into the EndpointSet for this forward's port and mode; ExternalName Services are resolved by
DNS and re-resolved every ``dns_interval``. No ``kubernetes`` import: the watches are
someone else's (``kubernetes.py``); this only consumes their results.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.resolve.dns import system_lookup
from portproxy.resolve.kube_state import Outcome, SharedService, resolve_view
from portproxy.spec import HostTarget, Protocol, ServiceTarget, TargetMode

log = logging.getLogger("portproxy.kube")


class KubeServiceResolver:
    """One forward's view of a Service: yields its EndpointSet for one port and mode."""

    def __init__(self, target: ServiceTarget, mode: TargetMode,
                 acquire: Callable[[], SharedService], release: Callable[[SharedService], None],
                 dns_interval: float, forward: str = "",
                 protocols: tuple[Protocol, ...] = (Protocol.TCP,)) -> None:
        self.target = target
        self.mode = mode
        self.protocols = protocols
        self._acquire = acquire
        self._release = release
        self._dns_interval = dns_interval
        self._prefix = f"forward {forward}: " if forward else ""
        self._shared: SharedService | None = None
        self._problem: str | None = None

    @property
    def problem(self) -> str | None:
        """Why the target does not resolve now (a failing watch, a Service without the
        port, ...), or None: shown by /readyz and /forwards next to the forward."""
        watch = self._shared.problem if self._shared is not None else None
        return watch or self._problem

    def describe(self) -> str:
        return str(self.target) + (" (clusterip)" if self.mode is TargetMode.CLUSTERIP else "")

    async def watch(self) -> AsyncIterator[EndpointSet]:
        shared = self._shared = self._acquire()
        try:
            last: EndpointSet | None = None
            problem: str | None = None
            dns_failure: str | None = None
            version = -1
            outcome = Outcome()
            while True:
                if shared.version != version:
                    version = shared.version
                    outcome = resolve_view(shared.view, self.target, self.mode, self.protocols)
                    if outcome.problem != problem and outcome.problem:
                        log.warning("%s%s", self._prefix, outcome.problem)
                    problem = self._problem = outcome.problem
                snapshot = outcome.endpoints
                if outcome.external is not None:
                    snapshot, failure = await self._lookup(outcome.external)
                    if failure and failure != dns_failure:
                        log.warning("%s%s", self._prefix, failure)  # once per failing streak
                    dns_failure = failure
                    self._problem = failure or problem
                    snapshot = snapshot if snapshot is not None else last  # keep last good
                if snapshot is not None and snapshot != last:
                    self._log_change(last, snapshot)
                    last = snapshot
                    yield snapshot
                interval = self._dns_interval if outcome.external else None
                await shared.wait_newer(version, interval)
        finally:
            self._shared = None
            self._release(shared)

    async def _lookup(self, external: HostTarget) -> tuple[EndpointSet | None, str | None]:
        """(endpoints, None) or (None, the failure line) for an ExternalName."""
        try:
            addresses = await system_lookup(external.host)
        except OSError as exc:
            return None, (f"{self.target}: cannot resolve ExternalName {external.host}: "
                          f"{exc}; keeping the last known endpoints, retrying")
        return EndpointSet.of([Endpoint(a, external.port) for a in addresses]), None

    def _log_change(self, old: EndpointSet | None, new: EndpointSet) -> None:
        added, removed = (old or EndpointSet()).diff(new)
        # Debug only: the consumer (TargetState) logs each forward's change at info.
        log.debug("%s: %d endpoint(s)%s%s", self.describe(), len(new),
                  f" +{[str(e) for e in added]}" if added else "",
                  f" -{[str(e) for e in removed]}" if removed else "")
