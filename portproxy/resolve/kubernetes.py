"""Kubernetes Services through the API — the only module that imports ``kubernetes``.

The official client is synchronous, so every watch runs in its own daemon thread (see
``kube_informer``) and hands results to the event loop with ``call_soon_threadsafe``. The
client's ``Watch`` helper is deliberately not used: it deserialises BOOKMARK events into
typed models (which fails: a bookmark has only a resourceVersion), retries a 410 once with
the same stale resourceVersion, and ends silently when a stream without resourceVersion
ends. Instead the typed API functions are called with ``_preload_content=False`` and the
raw JSON lines are read here. Every request carries ``_request_timeout``: without it a dead
connection hangs a thread forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import urllib3
from kubernetes import client
from kubernetes.config.incluster_config import InClusterConfigLoader
from kubernetes.config.kube_config import load_kube_config

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.errors import ResolveError, SetupError
from portproxy.metrics import ProxyMetrics
from portproxy.resolve import Resolver
from portproxy.resolve.dns import system_lookup
from portproxy.resolve.kube_client import check_error
from portproxy.resolve.kube_informer import (
    Aborter,
    ApiStatusError,
    Backoff,
    Informer,
    Obj,
    Query,
    TransientError,
)
from portproxy.resolve.kube_resolver import KubeServiceResolver
from portproxy.resolve.kube_state import Problem, ServiceView, SharedService, resolve_view
from portproxy.spec import Protocol, ServiceTarget, TargetMode
from portproxy.threaded import call_in_thread

log = logging.getLogger("portproxy.kube")


@dataclass(frozen=True, slots=True)
class KubeSettings:
    """How to reach the API and how patiently."""

    kubeconfig: str | None = None
    """--kubeconfig. When unset and a service account is mounted (and
    KUBERNETES_SERVICE_HOST is set) the in-cluster config is used; else KUBECONFIG, else
    ~/.kube/config. An explicit kubeconfig or context always wins over in-cluster."""
    context: str | None = None
    """--context: the kubeconfig context to use (default: the file's current-context)."""
    serviceaccount_dir: str = "/var/run/secrets/kubernetes.io/serviceaccount"
    """Where the service account token and ca.crt are mounted (overridable for tests)."""
    node_name: str | None = None
    """NODE_NAME (downward API); informational here, the Balancer prefers local pods."""
    request_timeout: float = 10.0
    """Seconds to connect, and to wait for any single read of a plain request. A healthy API
    answers a GET/LIST in well under a second; 10 s rides out a busy control plane while
    keeping a dead connection from hanging a watch thread."""
    watch_timeout_seconds: int = 60
    """Server-side timeoutSeconds of each watch. The client-side read timeout of a watch is
    this plus ``request_timeout``, so a stalled (black-holed) stream is noticed within
    70 s; re-opening an idle watch once a minute costs one cheap request per Service."""
    backoff: Backoff = field(default_factory=Backoff)
    """Retry delays after a failure: 0.5 s doubling per failure (with jitter), capped at
    30 s, so an API outage is noticed within 30 s of its end."""
    dns_interval: float = 30.0
    """Seconds between re-resolutions of an ExternalName Service's DNS name."""


def without_userinfo(url: str) -> str:
    """``url`` without the ``user:password@`` part, fit for messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def config_source(settings: KubeSettings) -> tuple[bool, str]:
    """Where the client configuration comes from: ``(True, service account dir)`` in a
    pod (its token mounted, KUBERNETES_SERVICE_HOST set, no kubeconfig or context given),
    else ``(False, kubeconfig path)``: ``--kubeconfig``, else KUBECONFIG, else
    ~/.kube/config (KUBECONFIG may list several files, separated by ':')."""
    sa_dir = settings.serviceaccount_dir
    if (os.path.isfile(os.path.join(sa_dir, "token"))
            and os.environ.get("KUBERNETES_SERVICE_HOST")
            and settings.kubeconfig is None and settings.context is None):
        return True, sa_dir
    return False, settings.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"


def _load_configuration(settings: KubeSettings) -> client.Configuration:
    configuration = client.Configuration()
    in_cluster, path = config_source(settings)
    sa_dir = settings.serviceaccount_dir
    token = os.path.join(sa_dir, "token")
    try:
        if in_cluster:
            # Re-reads the token file every minute: bound service account tokens rotate.
            loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
                token_filename=token, cert_filename=os.path.join(sa_dir, "ca.crt"))
            loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
        else:
            load_kube_config(  # type: ignore[no-untyped-call]
                config_file=path, context=settings.context,
                client_configuration=configuration, persist_config=False)
    except Exception as exc:  # ConfigException, YAML errors, exec plugins: all the user's setup
        where = f"the in-cluster service account in {sa_dir}" if in_cluster \
            else f"kubeconfig {path}"
        if isinstance(exc, FileNotFoundError) and "temporary directory" in str(exc):
            # The client writes a kubeconfig's inline certificates and keys to temporary
            # files; a read-only container (docker run --read-only) has nowhere to put them.
            hint = ("the client writes the kubeconfig's inline certificates to a temporary "
                    "directory: mount a writable /tmp (docker run --tmpfs /tmp, or an "
                    "emptyDir in Kubernetes)")
        elif in_cluster:
            hint = "check the pod's service account token and CA"
        else:
            hint = ("give a working one with --kubeconfig/KUBECONFIG (and --context), or run "
                    "in a pod with a service account")
        raise SetupError(f"cannot load the Kubernetes client configuration from {where}: "
                         f"{exc}; {hint}".replace("\n", " ")) from None
    # Every watch holds a connection while it runs; keep them pooled instead of discarded.
    configuration.connection_pool_maxsize = 64
    # No urllib3-level retries: the informer retries with backoff and says so once, instead
    # of urllib3 logging a warning per immediate retry against an API that is down.
    configuration.retries = False
    return configuration


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Client exceptions → the informer's two kinds (status from the API, or transport)."""
    try:
        yield
    except client.ApiException as exc:
        if not exc.status:
            raise TransientError(str(exc.reason)) from None
        message = str(exc.reason)
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = str(json.loads(exc.body or "").get("message") or message)
        raise ApiStatusError(int(exc.status), message) from None
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
            ValueError) as exc:  # ValueError: a garbled JSON line
        raise TransientError(f"{type(exc).__name__}: {exc}") from None


_PATHS = {
    "services": "/api/v1/namespaces/{namespace}/services",
    "configmaps": "/api/v1/namespaces/{namespace}/configmaps",
    "endpointslices": "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
}


class _ClientTransport:
    """The informer's ``Transport`` with the official client, raw JSON all the way.

    Requests go through ``ApiClient.param_serialize``/``call_api`` — exactly what the
    generated ``CoreV1Api``/``DiscoveryV1Api`` methods do underneath (same auth, TLS,
    token refresh, URL encoding) — without importing those modules, whose thousands of
    pydantic models take seconds to load and are never used for raw JSON.
    """

    def __init__(self, settings: KubeSettings) -> None:
        self.settings = settings
        self.api_client = client.ApiClient(_load_configuration(settings))
        # For messages: a kubeconfig server URL may carry credentials (https://user:pw@…).
        self.host = without_userinfo(str(self.api_client.configuration.host))

    def _request(self, path: str, namespace: str, params: list[tuple[str, str]],
                 timeout: tuple[float, float]) -> urllib3.BaseHTTPResponse:
        api = self.api_client
        with _translated():
            request = api.param_serialize(
                "GET", path, path_params={"namespace": namespace}, query_params=params,
                header_params={"Accept": "application/json", **api.default_headers},
                auth_settings=["BearerToken"])
            response = api.call_api(*request, _request_timeout=timeout)
            if not 200 <= response.status <= 299:
                response.read()  # type: ignore[no-untyped-call]  # the Status body
                client.ApiException.from_response(http_resp=response, body=None, data=None)
            raw: urllib3.BaseHTTPResponse = response.response
            return raw

    def _call(self, query: Query, params: list[tuple[str, str]],
              timeout: tuple[float, float]) -> urllib3.BaseHTTPResponse:
        if query.label_selector:
            params.append(("labelSelector", query.label_selector))
        if query.field_selector:
            params.append(("fieldSelector", query.field_selector))
        return self._request(_PATHS[query.resource], query.namespace, params, timeout)

    def list(self, query: Query) -> tuple[list[Obj], str]:
        timeout = self.settings.request_timeout
        response = self._call(query, [], (timeout, timeout))
        with _translated():
            try:
                body = json.loads(response.data)
            finally:
                response.release_conn()
        items = body.get("items") or []
        return list(items), str((body.get("metadata") or {}).get("resourceVersion") or "")

    def watch(self, query: Query, resource_version: str, aborter: Aborter) -> Iterator[Obj]:
        settings = self.settings
        params = [("watch", "true"), ("allowWatchBookmarks", "true"),
                  ("timeoutSeconds", str(settings.watch_timeout_seconds))]
        if resource_version:
            params.append(("resourceVersion", resource_version))
        response = self._call(query, params, (
            settings.request_timeout, settings.watch_timeout_seconds + settings.request_timeout))
        aborter.attach(lambda: _abort(response))
        return self._events(response)

    @staticmethod
    def _events(response: urllib3.BaseHTTPResponse) -> Iterator[Obj]:
        complete = False
        buffer = b""
        try:
            with _translated():
                for chunk in response.stream(65536):
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            yield json.loads(line)
                if buffer.strip():
                    yield json.loads(buffer)
            complete = True
        finally:
            # A fully read response goes back to the pool; anything else is closed, never
            # reused half-read.
            if complete:
                response.release_conn()
            else:
                response.close()

    def get_service(self, namespace: str, name: str) -> Obj | None:
        timeout = self.settings.request_timeout
        path = _PATHS["services"] + "/" + quote(name, safe="")
        try:
            response = self._request(path, namespace, [], (timeout, timeout))
            with _translated():
                try:
                    return dict(json.loads(response.data))
                finally:
                    response.release_conn()
        except ApiStatusError as exc:
            if exc.code == 404:
                return None
            raise


def _abort(response: urllib3.BaseHTTPResponse) -> None:
    """Unblock the thread reading ``response`` (it closes the response itself)."""
    shutdown = getattr(response, "shutdown", None)  # urllib3 >= 2.3
    if shutdown is not None:
        shutdown()
    else:
        response.close()


class KubeResolvers:
    """Every Kubernetes watch of the process: one set per Service, however many forwards."""

    def __init__(self, settings: KubeSettings, metrics: ProxyMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._transport: _ClientTransport | None = None
        self._services: dict[tuple[str, str], SharedService] = {}
        self._informers: set[Informer] = set()

    def _client(self) -> _ClientTransport:
        if self._transport is None:  # lazily: constructing this object touches no files
            self._transport = _ClientTransport(self.settings)
        return self._transport

    def load_configuration(self) -> None:
        """Read the kubeconfig or service account now (SetupError if it is unusable)."""
        self._client()

    def resolver(self, target: ServiceTarget, mode: TargetMode, forward: str = "",
                 protocols: tuple[Protocol, ...] = (Protocol.TCP,)) -> Resolver:
        """``forward``: the name of the forward it serves, for messages; ``protocols``: its
        protocols, which pick the Service's port entries."""
        return KubeServiceResolver(target, mode, lambda: self._acquire(target, mode, forward),
                                   lambda shared: self._release(shared, forward),
                                   self.settings.dns_interval, forward, protocols)

    # --- shared watches (on the event loop) ------------------------------------------------

    def _acquire(self, target: ServiceTarget, mode: TargetMode,
                 forward: str = "") -> SharedService:
        self._client()  # a configuration error surfaces before anything is registered
        key = (target.namespace, target.name)
        shared = self._services.get(key)
        if shared is None:
            shared = self._services[key] = SharedService(*key)
            self._start(shared, Query("services", target.namespace,
                                      field_selector=f"metadata.name={target.name}"),
                        lambda objects: {"service": objects.get(target.name),
                                         "service_synced": True})
        if mode is TargetMode.ENDPOINTS and "endpointslices" not in shared.informers:
            selector = f"kubernetes.io/service-name={target.name}"
            self._start(shared, Query("endpointslices", target.namespace,
                                      label_selector=selector),
                        lambda objects: {"slices": tuple(objects[k] for k in sorted(objects)),
                                         "slices_synced": True})
        shared.consumers += 1
        if forward:
            shared.forwards.append(forward)
        return shared

    def _start(self, shared: SharedService, query: Query,
               changes: Callable[[dict[str, Obj]], dict[str, Any]]) -> None:
        informer = self._informer(
            query, f"{shared.namespace}/{shared.name}",
            lambda objects: shared.update(**changes(objects)),
            lambda problem: shared.report(query.resource, problem))
        shared.informers[query.resource] = informer
        informer.start()

    def _informer(self, query: Query, label: str, apply: Callable[[dict[str, Obj]], None],
                  report: Callable[[Problem | None], None] | None = None) -> Informer:
        loop = asyncio.get_running_loop()
        transport = self._client()

        def hop(function: Callable[..., None], *args: Any) -> None:
            try:
                loop.call_soon_threadsafe(function, *args)
            except RuntimeError:  # the loop is closed: the process is going away
                informer.stop()

        informer = Informer(transport, query, lambda objects: hop(apply, objects),
                            lambda: hop(self._count_restart, label),
                            self.settings.backoff, name=f"kube-watch {query}",
                            on_problem=None if report is None else (
                                lambda problem: hop(report, problem)))
        self._informers.add(informer)
        return informer

    def _count_restart(self, label: str) -> None:
        if self.metrics is not None:
            self.metrics.kube_watch_restarts.labels(label).inc()

    def _release(self, shared: SharedService, forward: str = "") -> None:
        shared.consumers -= 1
        if forward in shared.forwards:
            shared.forwards.remove(forward)
        if shared.consumers > 0:
            return
        self._services.pop((shared.namespace, shared.name), None)
        for informer in shared.informers.values():
            informer.stop()
            self._informers.discard(informer)

    async def close(self) -> None:
        """Stop every watch thread; waits a bounded time (they are daemons regardless)."""
        informers = list(self._informers)
        for informer in informers:
            informer.stop()
        self._informers.clear()
        self._services.clear()
        deadline = asyncio.get_running_loop().time() + 2.0
        while any(i.alive for i in informers) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self._transport is not None:
            self._transport.api_client.rest_client.close()

    # --- one-shot and ConfigMap ------------------------------------------------------------

    async def check_once(self, target: ServiceTarget, mode: TargetMode,
                         protocols: tuple[Protocol, ...] = (Protocol.TCP,)) -> EndpointSet:
        """Resolve once for ``portproxy check``: ResolveError/SetupError when it would fail."""
        transport = self._client()
        view = await call_in_thread(lambda: self._read_view(transport, target, mode),
                                    name="kube-call")
        outcome = resolve_view(view, target, mode, protocols)
        if view.service is None:
            raise ResolveError(f"Service {target.namespace}/{target.name} not found")
        if outcome.problem:
            raise ResolveError(outcome.problem)
        if outcome.external is not None:
            try:
                addresses = await system_lookup(outcome.external.host)
            except OSError as exc:
                raise ResolveError(f"{target}: cannot resolve ExternalName "
                                   f"{outcome.external.host}: {exc}") from None
            return EndpointSet.of([Endpoint(a, outcome.external.port) for a in addresses])
        return outcome.endpoints or EndpointSet()

    @staticmethod
    def _read_view(transport: _ClientTransport, target: ServiceTarget,
                   mode: TargetMode) -> ServiceView:
        query = Query("services", target.namespace)
        try:
            service = transport.get_service(target.namespace, target.name)
            slices: list[Obj] = []
            if service is not None and mode is TargetMode.ENDPOINTS:
                query = Query("endpointslices", target.namespace,
                              label_selector=f"kubernetes.io/service-name={target.name}")
                slices, _ = transport.list(query)
        except (ApiStatusError, TransientError) as exc:
            verb = "get" if query.resource == "services" else "list"
            raise check_error(exc, verb, query, transport.host) from None
        return ServiceView(True, service, True, tuple(slices))

    async def watch_configmap(self, namespace: str, name: str) -> AsyncIterator[dict[str, str]]:
        """The ConfigMap's data on first read and on every change ({} when missing)."""
        latest: list[dict[str, Obj]] = []
        changed = asyncio.Event()

        def apply(objects: dict[str, Obj]) -> None:
            latest[:] = [objects]
            changed.set()

        query = Query("configmaps", namespace, field_selector=f"metadata.name={name}")
        informer = self._informer(query, f"{namespace}/{name}", apply)
        informer.start()
        try:
            last: dict[str, str] | None = None
            while True:
                await changed.wait()
                changed.clear()
                configmap = latest[0].get(name) or {}
                data = {str(k): str(v) for k, v in (configmap.get("data") or {}).items()}
                if data != last:
                    last = data
                    yield data
        finally:
            informer.stop()
            self._informers.discard(informer)
