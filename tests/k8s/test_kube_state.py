"""Pure parts of the Kubernetes resolver: view → outcome, backoff, error lines, thread hand-off."""

from __future__ import annotations

import asyncio
import threading

import pytest

from portproxy.endpoints import EndpointSet
from portproxy.errors import ResolveError, SetupError
from portproxy.resolve.kube_client import check_error
from portproxy.resolve.kube_informer import (
    ApiStatusError,
    Backoff,
    Query,
    TransientError,
    problem_line,
)
from portproxy.resolve.kube_state import ServiceView, SharedService, resolve_view
from portproxy.spec import HostTarget, Protocol, ServiceTarget, TargetMode
from portproxy.threaded import call_in_thread
from tests.k8s.conftest import ep, hosts

E, C = TargetMode.ENDPOINTS, TargetMode.CLUSTERIP
TCP, UDP = Protocol.TCP, Protocol.UDP
SERVICE = {"metadata": {"name": "web"},
           "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}]}}
SLICE = {"addressType": "IPv4", "endpoints": [ep("10.1.0.1")],
         "ports": [{"name": "http", "port": 8080}]}
T = ServiceTarget("ns", "web", "http")


def test_nothing_is_resolved_before_the_first_lists() -> None:
    assert resolve_view(ServiceView(), T, E).endpoints is None
    assert resolve_view(ServiceView(True, SERVICE), T, E).endpoints is None  # slices pending
    assert resolve_view(ServiceView(slices_synced=True, slices=(SLICE,)), T, E).endpoints is None


def test_endpoints_and_clusterip_outcomes() -> None:
    view = ServiceView(True, SERVICE, True, (SLICE,))
    assert hosts(resolve_view(view, T, E).endpoints) == ["10.1.0.1:8080"]
    assert hosts(resolve_view(view, ServiceTarget("ns", "web", 80), E).endpoints) == [
        "10.1.0.1:8080"]
    assert hosts(resolve_view(view, T, C).endpoints) == ["10.96.0.1:80"]
    # ClusterIP mode needs no slices at all.
    assert hosts(resolve_view(ServiceView(True, SERVICE), T, C).endpoints) == ["10.96.0.1:80"]


def test_missing_service_and_port_are_empty_with_a_reason() -> None:
    missing = resolve_view(ServiceView(True, None, True, (SLICE,)), T, E)
    assert missing.endpoints == EndpointSet() and "not found" in (missing.problem or "")
    wrong = resolve_view(ServiceView(True, SERVICE, True, (SLICE,)),
                         ServiceTarget("ns", "web", 81), C)
    assert wrong.endpoints == EndpointSet() and "no TCP port 81 (ports: http=80)" in (
        wrong.problem or "")


KUBE_DNS = {"spec": {"clusterIP": "10.96.0.10", "ports": [
    {"name": "dns", "port": 53, "protocol": "UDP"},
    {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
    {"name": "metrics", "port": 9153, "protocol": "TCP"}]}}
KUBE_DNS_SLICE = {"addressType": "IPv4", "endpoints": [ep("10.1.0.7")], "ports": [
    {"name": "dns", "port": 5353, "protocol": "UDP"},
    {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
    {"name": "metrics", "port": 9153, "protocol": "TCP"}]}
SYSLOG = {"spec": {"clusterIP": "10.96.0.20", "ports": [
    {"name": "syslog-udp", "port": 514, "protocol": "UDP"},
    {"name": "syslog-tcp", "port": 514, "protocol": "TCP"}]}}
SYSLOG_SLICE = {"addressType": "IPv4", "endpoints": [ep("10.1.0.1")], "ports": [
    {"name": "syslog-udp", "port": 5514, "protocol": "UDP"},
    {"name": "syslog-tcp", "port": 6514, "protocol": "TCP"}]}


def test_the_forwards_protocol_picks_the_service_port() -> None:
    syslog = ServiceView(True, SYSLOG, True, (SYSLOG_SLICE,))
    target = ServiceTarget("logs", "syslog", 514)
    assert hosts(resolve_view(syslog, target, E, (TCP,)).endpoints) == ["10.1.0.1:6514"]
    assert hosts(resolve_view(syslog, target, E, (UDP,)).endpoints) == ["10.1.0.1:5514"]
    # A name stands for its number: the UDP entry's name in a TCP forward is 514/TCP.
    by_name = ServiceTarget("logs", "syslog", "syslog-udp")
    assert hosts(resolve_view(syslog, by_name, E, (TCP,)).endpoints) == ["10.1.0.1:6514"]
    both = resolve_view(syslog, target, E, (TCP, UDP))
    assert both.endpoints == EndpointSet() and "other pod ports for TCP than for UDP" in (
        both.problem or "")
    assert hosts(resolve_view(syslog, target, C, (TCP, UDP)).endpoints) == ["10.96.0.20:514"]

    dns = ServiceView(True, KUBE_DNS, True, (KUBE_DNS_SLICE,))
    for port in ("dns", "dns-tcp", 53):  # the README's tcp+udp example, any spelling
        outcome = resolve_view(dns, ServiceTarget("kube-system", "kube-dns", port), E,
                               (TCP, UDP))
        assert hosts(outcome.endpoints) == ["10.1.0.7:5353"], port
    metrics = ServiceTarget("kube-system", "kube-dns", "metrics")
    for mode in (E, C):  # kube-proxy has no UDP rule for a TCP-only port
        outcome = resolve_view(dns, metrics, mode, (UDP,))
        assert outcome.endpoints == EndpointSet() and \
            "has no UDP port 'metrics' (ports: dns=53/UDP, dns-tcp=53, metrics=9153)" in (
                outcome.problem or "")


def test_headless_and_unallocated_cluster_ip() -> None:
    headless = {"spec": {"clusterIP": "None", "clusterIPs": ["None"], "ports": [{"port": 80}]}}
    outcome = resolve_view(ServiceView(True, headless), ServiceTarget("ns", "db", 80), C)
    assert outcome.endpoints == EndpointSet() and "mode=endpoints" in (outcome.problem or "")
    pending = {"spec": {"ports": [{"port": 80}]}}
    outcome = resolve_view(ServiceView(True, pending), ServiceTarget("ns", "db", 80), C)
    assert outcome.endpoints == EndpointSet() and "no ClusterIP" in (outcome.problem or "")


def test_external_name_asks_for_dns() -> None:
    external = {"spec": {"type": "ExternalName", "externalName": "db.example.com.",
                         "ports": [{"name": "pg", "port": 5432}]}}
    view = ServiceView(True, external)
    for mode in (E, C):
        assert resolve_view(view, ServiceTarget("ns", "db", "pg"), mode).external == \
            HostTarget("db.example.com", 5432)
    assert resolve_view(view, ServiceTarget("ns", "db", 7000), C).external == \
        HostTarget("db.example.com", 7000)
    # The port entries only name numbers: a UDP forward may use a TCP entry's name.
    assert resolve_view(view, ServiceTarget("ns", "db", "pg"), C, (UDP,)).external == \
        HostTarget("db.example.com", 5432)
    assert "no TCP port 'x'" in (
        resolve_view(view, ServiceTarget("ns", "db", "x"), C).problem or "")
    empty = ServiceView(True, {"spec": {"type": "ExternalName"}})
    assert "without an externalName" in (resolve_view(empty, T, C).problem or "")


def test_backoff_doubles_caps_and_jitters_within_bounds() -> None:
    backoff = Backoff(0.5, 30.0)
    assert [backoff.delay(n, rng=lambda: 0.0) for n in range(4)] == [0.25, 0.5, 1.0, 2.0]
    assert backoff.delay(3, rng=lambda: 0.999999) == pytest.approx(4.0, rel=1e-5)
    assert backoff.delay(100, rng=lambda: 0.999999) <= 30.0
    assert backoff.delay(100, rng=lambda: 0.0) == 15.0


def test_problem_lines_name_verb_resource_namespace() -> None:
    query = Query("endpointslices", "web", label_selector="kubernetes.io/service-name=x")
    forbidden = problem_line(ApiStatusError(403, "nope"), "watch", query)
    assert "forbids watch on endpointslices.discovery.k8s.io in namespace 'web'" in forbidden
    assert "examples/" in forbidden and forbidden.endswith("retrying")
    assert "HTTP 401" in problem_line(ApiStatusError(401, "Unauthorized"), "list", query)
    assert "keeping the last known state" in problem_line(TransientError("boom"), "list", query)
    assert isinstance(check_error(ApiStatusError(403, "no"), "get", query, "h"), SetupError)
    assert isinstance(check_error(ApiStatusError(401, "no"), "get", query, "h"), SetupError)
    unreachable = check_error(TransientError("refused"), "get", query, "https://h:6443")
    assert isinstance(unreachable, ResolveError) and "https://h:6443" in str(unreachable)
    assert isinstance(check_error(ApiStatusError(500, "x"), "get", query, "h"), ResolveError)


def test_call_in_thread_returns_raises_and_never_leaks_stopiteration() -> None:
    def stop() -> int:
        raise StopIteration

    def fail() -> int:
        raise ValueError("bad")

    async def main() -> None:
        assert await call_in_thread(lambda: threading.current_thread().daemon) is True
        with pytest.raises(RuntimeError, match="StopIteration"):
            await call_in_thread(stop)
        with pytest.raises(ValueError, match="bad"):
            await call_in_thread(fail)

    asyncio.run(main())


def test_shared_service_wakes_waiters_on_update() -> None:
    async def main() -> None:
        shared = SharedService("ns", "web")
        waiter = asyncio.ensure_future(shared.wait_newer(0))
        await asyncio.sleep(0)
        assert not waiter.done()
        shared.update(service_synced=True)
        await asyncio.wait_for(waiter, 5)
        assert shared.version == 1 and shared.view.service_synced
        await asyncio.wait_for(shared.wait_newer(0), 5)  # already newer: returns at once
        await shared.wait_newer(1, timeout=0.01)  # nothing new: the timeout ends the wait
        assert shared.version == 1  # and it ended without a change

    asyncio.run(main())
