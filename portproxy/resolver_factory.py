"""Which resolver a forward's target gets: a static IP, a DNS name or a Kubernetes Service.

``Resolvers`` also owns the process's one Kubernetes client, shared by every Service forward
and ConfigMap watch, and created on first use: a process without Service targets never
loads the client. Its configuration is read as soon as it is created, so a broken
kubeconfig fails the start (or the reload) that needed it, not a watch task later. The
daemon and the workers' supervisor both build their resolvers here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from portproxy.config import Settings
from portproxy.errors import SetupError
from portproxy.metrics import ProxyMetrics
from portproxy.resolve import Resolver
from portproxy.resolve.dns import DnsResolver
from portproxy.resolve.static import StaticResolver
from portproxy.spec import Forward, HostTarget, ServiceTarget


class Resolvers:
    """Creates each forward's resolver; owns the Kubernetes client (one per process)."""

    def __init__(self, settings: Settings, metrics: ProxyMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._kube: Any = None

    def for_forward(self, forward: Forward) -> Resolver:
        target = forward.target
        if isinstance(target, ServiceTarget):
            try:
                kube = self.kube()
            except SetupError as exc:
                raise SetupError(f"forward {forward.name}: {exc}") from None
            resolver: Resolver = kube.resolver(target, forward.options.mode, forward.name,
                                               forward.protocols)
            return resolver
        assert isinstance(target, HostTarget)
        return StaticResolver(target) if target.is_ip else DnsResolver(target,
                                                                        forward=forward.name)

    def kube(self) -> Any:
        # Imported on first use: processes without Service targets never load the client.
        from portproxy.resolve.kubernetes import KubeResolvers, KubeSettings

        if self._kube is None:
            kube = KubeResolvers(
                KubeSettings(kubeconfig=self.settings.kubeconfig,
                             context=self.settings.kube_context,
                             node_name=self.settings.node_name),
                self.metrics)
            # Now, not in the first watch: a broken kubeconfig or service account stops the
            # start with one line (exit 3) instead of failing a watch task once running.
            kube.load_configuration()
            self._kube = kube
        return self._kube

    async def close(self) -> None:
        if self._kube is not None:
            await self._kube.close()


ResolverFactory = Callable[[Forward], Resolver]
