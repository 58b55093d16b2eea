"""mode=endpoints against the fake API with the real client: start, follow, share, fail, recover."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading

import pytest

from portproxy.errors import ResolveError, SetupError
from portproxy.metrics import ProxyMetrics
from portproxy.resolve.kubernetes import KubeResolvers, KubeSettings
from portproxy.spec import Protocol, ServiceTarget, TargetMode
from tests.k8s.conftest import Collector, ep, hosts, poll
from tests.k8s.fakeapi import FakeKube

WEB = ServiceTarget("web", "frontend", "http")
PORTS = [{"name": "http", "port": 80, "targetPort": "http"},
         {"name": "metrics", "port": 9090, "targetPort": 9090}]
SLICE_PORTS = [{"name": "http", "port": 8080, "protocol": "TCP"},
               {"name": "metrics", "port": 9090, "protocol": "TCP"}]


def populate(fake: FakeKube, ips: list[str], name: str = "frontend-abc") -> None:
    fake.service("web", "frontend", PORTS)
    fake.endpoint_slice("web", "frontend", name, [ep(ip) for ip in ips], SLICE_PORTS)


def run(coro_fn, settings: KubeSettings, metrics: ProxyMetrics | None = None) -> None:
    async def main() -> None:
        kube = KubeResolvers(settings, metrics)
        try:
            await coro_fn(kube)
        finally:
            await kube.close()
    asyncio.run(main())


def test_starts_with_ready_endpoints_by_port_name_and_number(fake, settings) -> None:
    populate(fake, ["10.1.0.2", "10.1.0.1"])
    fake.endpoint_slice("web", "frontend", "frontend-v6", [ep("fd00::7")], SLICE_PORTS,
                        address_type="IPv6")
    fake.endpoint_slice("web", "other", "other-1", [ep("10.9.9.9")], SLICE_PORTS)

    async def scenario(kube: KubeResolvers) -> None:
        by_name = Collector(kube.resolver(WEB, TargetMode.ENDPOINTS).watch())
        by_number = Collector(kube.resolver(ServiceTarget("web", "frontend", 9090),
                                            TargetMode.ENDPOINTS).watch())
        try:
            first = await by_name.wait_for(bool)
            assert hosts(first) == ["10.1.0.1:8080", "10.1.0.2:8080", "[fd00::7]:8080"]
            metrics = await by_number.wait_for(bool)
            assert hosts(metrics) == ["10.1.0.1:9090", "10.1.0.2:9090", "[fd00::7]:9090"]
            assert len(by_name.snapshots) == 1  # one snapshot, not one per slice
        finally:
            await by_name.close()
            await by_number.close()

    run(scenario, settings)


def test_the_forwards_protocol_picks_the_port(fake, settings) -> None:
    # One port number, two protocols, two pod ports: as kube-proxy, by name and protocol.
    fake.service("logs", "syslog", [{"name": "syslog-udp", "port": 514, "protocol": "UDP"},
                                    {"name": "syslog-tcp", "port": 514, "protocol": "TCP"}])
    fake.endpoint_slice("logs", "syslog", "syslog-1", [ep("10.1.0.1")],
                        [{"name": "syslog-udp", "port": 5514, "protocol": "UDP"},
                         {"name": "syslog-tcp", "port": 6514, "protocol": "TCP"}])
    target = ServiceTarget("logs", "syslog", 514)

    async def scenario(kube: KubeResolvers) -> None:
        tcp = Collector(kube.resolver(target, TargetMode.ENDPOINTS, "t", (Protocol.TCP,))
                        .watch())
        udp = Collector(kube.resolver(target, TargetMode.ENDPOINTS, "u", (Protocol.UDP,))
                        .watch())
        try:
            assert hosts(await tcp.wait_for(bool)) == ["10.1.0.1:6514"]
            assert hosts(await udp.wait_for(bool)) == ["10.1.0.1:5514"]
        finally:
            await tcp.close()
            await udp.close()

    run(scenario, settings)


def test_follows_scale_up_down_and_readiness(fake, settings) -> None:
    populate(fake, ["10.1.0.1"])

    async def scenario(kube: KubeResolvers) -> None:
        c = Collector(kube.resolver(WEB, TargetMode.ENDPOINTS).watch())
        try:
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.1:8080"])
            fake.endpoint_slice("web", "frontend", "frontend-abc",
                                [ep("10.1.0.1"), ep("10.1.0.2", ready=False)], SLICE_PORTS)
            fake.endpoint_slice("web", "frontend", "frontend-def", [ep("10.1.0.3")],
                                SLICE_PORTS)
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.1:8080", "10.1.0.3:8080"])
            fake.endpoint_slice("web", "frontend", "frontend-abc",
                                [ep("10.1.0.1", ready=False, terminating=True),
                                 ep("10.1.0.2")], SLICE_PORTS)
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.2:8080", "10.1.0.3:8080"])
            fake.delete("endpointslices", "web", "frontend-def")
            fake.endpoint_slice("web", "frontend", "frontend-abc",
                                [ep("10.1.0.2", ready=False, terminating=True)], SLICE_PORTS)
            # None ready: the serving-and-terminating pod keeps taking traffic.
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.2:8080"])
            fake.endpoint_slice("web", "frontend", "frontend-abc", None, SLICE_PORTS)
            await c.wait_for(lambda s: len(s) == 0)
        finally:
            await c.close()

    run(scenario, settings)


def test_one_watch_per_service_shared_by_every_forward(fake, settings) -> None:
    populate(fake, ["10.1.0.1"])

    async def scenario(kube: KubeResolvers) -> None:
        collectors = [Collector(kube.resolver(t, m).watch()) for t, m in [
            (WEB, TargetMode.ENDPOINTS), (WEB, TargetMode.ENDPOINTS),
            (ServiceTarget("web", "frontend", 9090), TargetMode.ENDPOINTS),
            (ServiceTarget("web", "frontend", 80), TargetMode.CLUSTERIP)]]
        try:
            for c in collectors:
                await c.wait_for(bool)
            await poll(lambda: fake.active_watches() == 2, what="two watch streams")
            assert fake.count("list", "endpointslices") == 1
            assert fake.count("list", "services") == 1
            fake.endpoint_slice("web", "frontend", "frontend-abc",
                                [ep("10.1.0.1"), ep("10.1.0.5")], SLICE_PORTS)
            for c in collectors[:3]:
                await c.wait_for(lambda s: len(s) == 2)
        finally:
            for c in collectors:
                await c.close()
        # Last consumer gone: its watches stop.
        await poll(lambda: fake.active_watches() == 0, what="watches to end")
        await poll(lambda: not [t for t in threading.enumerate()
                                if t.name.startswith("kube-watch")], what="threads to end")

    run(scenario, settings)


def test_missing_service_yields_empty_then_follows_creation_and_deletion(
        fake, settings, caplog) -> None:
    async def scenario(kube: KubeResolvers) -> None:
        c = Collector(kube.resolver(WEB, TargetMode.ENDPOINTS).watch())
        try:
            # Resolved (readiness) but empty: new connections are refused at once.
            await c.wait_for(lambda s: len(s) == 0)
            populate(fake, ["10.1.0.1"])
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.1:8080"])
            fake.delete("services", "web", "frontend")
            await c.wait_for(lambda s: len(s) == 0)
            fake.delete("endpointslices", "web", "frontend-abc")
            populate(fake, ["10.1.0.9"], name="frontend-xyz")
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.9:8080"])
        finally:
            await c.close()

    with caplog.at_level(logging.INFO, logger="portproxy.kube"):
        run(scenario, settings)
    missing = [r for r in caplog.records if "not found" in r.getMessage()]
    assert missing and "web/frontend" in missing[0].getMessage()


def test_unknown_port_is_reported_and_empty(fake, settings, caplog) -> None:
    populate(fake, ["10.1.0.1"])

    async def scenario(kube: KubeResolvers) -> None:
        c = Collector(kube.resolver(ServiceTarget("web", "frontend", "grpc"),
                                    TargetMode.ENDPOINTS).watch())
        try:
            await c.wait_for(lambda s: len(s) == 0)
        finally:
            await c.close()

    with caplog.at_level(logging.WARNING, logger="portproxy.kube"):
        run(scenario, settings)
    assert any("no TCP port 'grpc'" in r.getMessage() and "http=80" in r.getMessage()
               for r in caplog.records)


def test_rbac_forbidden_logs_one_line_then_recovers_when_granted(
        fake, settings, caplog) -> None:
    populate(fake, ["10.1.0.1"])
    fake.deny("list", "endpointslices", "web")

    async def scenario(kube: KubeResolvers) -> None:
        c = Collector(kube.resolver(WEB, TargetMode.ENDPOINTS).watch())
        try:
            await poll(lambda: fake.count("list", "endpointslices") >= 4, what="retries")
            assert not c.snapshots  # never resolved: readiness stays false
            fake.allow("list", "endpointslices", "web")
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.1:8080"])
        finally:
            await c.close()

    with caplog.at_level(logging.INFO, logger="portproxy.kube"):
        run(scenario, settings)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    line = errors[0]
    for part in ("forbids list", "endpointslices.discovery.k8s.io", "'web'", "examples/",
                 "retrying"):
        assert part in line, (part, line)
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_wrong_token_is_one_clear_401_line(fake, tmp_path, caplog) -> None:
    from tests.k8s.conftest import fast_settings, write_kubeconfig
    populate(fake, ["10.1.0.1"])
    settings = fast_settings(write_kubeconfig(tmp_path / "kc", fake.url, token="wrong"),
                             tmp_path)

    async def scenario(kube: KubeResolvers) -> None:
        c = Collector(kube.resolver(WEB, TargetMode.ENDPOINTS).watch())
        try:
            await poll(lambda: fake.count("list") >= 6, what="retries")
        finally:
            await c.close()

    with caplog.at_level(logging.INFO, logger="portproxy.kube"):
        run(scenario, settings)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors  # one per watched collection (services, endpointslices)
    assert all("HTTP 401" in e and "credentials" in e for e in errors)


def test_check_once(fake, settings) -> None:
    populate(fake, ["10.1.0.1", "10.1.0.2"])
    fake.service("web", "headless", PORTS, cluster_ip="None")

    async def scenario(kube: KubeResolvers) -> None:
        found = await kube.check_once(WEB, TargetMode.ENDPOINTS)
        assert hosts(found) == ["10.1.0.1:8080", "10.1.0.2:8080"]
        clusterip = await kube.check_once(ServiceTarget("web", "frontend", 9090),
                                          TargetMode.CLUSTERIP)
        assert hosts(clusterip) == ["10.96.0.10:9090"]
        with pytest.raises(ResolveError, match="web/missing not found"):
            await kube.check_once(ServiceTarget("web", "missing", 80), TargetMode.ENDPOINTS)
        with pytest.raises(ResolveError, match=r"headless.*mode=endpoints"):
            await kube.check_once(ServiceTarget("web", "headless", 80), TargetMode.CLUSTERIP)
        with pytest.raises(ResolveError, match="no TCP port 'grpc'"):
            await kube.check_once(ServiceTarget("web", "frontend", "grpc"),
                                  TargetMode.ENDPOINTS)
        fake.deny("get", "services", "web")
        with pytest.raises(SetupError, match="forbids get on services in namespace 'web'"):
            await kube.check_once(WEB, TargetMode.ENDPOINTS)
        fake.allow("get", "services", "web")
        fake.deny("list", "endpointslices", "web")
        with pytest.raises(SetupError, match="forbids list on endpointslices"):
            await kube.check_once(WEB, TargetMode.ENDPOINTS)
        fake.stop()
        with pytest.raises(ResolveError, match="cannot reach the Kubernetes API"):
            await kube.check_once(WEB, TargetMode.ENDPOINTS)

    run(scenario, settings)


def test_bad_kubeconfig_is_one_line_setup_error(tmp_path) -> None:
    from tests.k8s.conftest import fast_settings, write_kubeconfig
    broken = tmp_path / "broken"
    broken.write_text("{this is not: [valid")

    async def scenario() -> None:
        for path in (broken, tmp_path / "absent"):
            kube = KubeResolvers(fast_settings(path, tmp_path))
            with pytest.raises(SetupError) as info:
                await kube.check_once(WEB, TargetMode.ENDPOINTS)
            assert "\n" not in str(info.value) and str(path) in str(info.value)
            await kube.close()
        valid = write_kubeconfig(tmp_path / "valid", "http://127.0.0.1:9")
        kube = KubeResolvers(fast_settings(valid, tmp_path, context="nope"))
        with pytest.raises(SetupError, match="nope"):
            await kube.check_once(WEB, TargetMode.ENDPOINTS)

    asyncio.run(scenario())


def test_configmap_watch_yields_data_changes_and_deletion(fake, settings) -> None:
    async def scenario(kube: KubeResolvers) -> None:
        c = Collector(kube.watch_configmap("ingress", "tcp-services"))
        try:
            assert await c.wait_for(lambda d: d == {}) == {}
            fake.configmap("ingress", "tcp-services", {"2222": "db/ssh:22"})
            fake.configmap("ingress", "other", {"1": "x/y:1"})
            await c.wait_for(lambda d: d == {"2222": "db/ssh:22"})
            fake.configmap("ingress", "tcp-services", {"2222": "db/ssh:22", "53": "k/d:53"})
            await c.wait_for(lambda d: len(d) == 2)
            fake.delete("configmaps", "ingress", "tcp-services")
            await c.wait_for(lambda d: d == {})
            assert {"1": "x/y:1"} not in c.snapshots
        finally:
            await c.close()

    run(scenario, settings)


def test_close_stops_every_watch_thread_promptly(fake, settings) -> None:
    populate(fake, ["10.1.0.1"])

    async def scenario() -> None:
        kube = KubeResolvers(settings)
        c = Collector(kube.resolver(WEB, TargetMode.ENDPOINTS).watch())
        cm = Collector(kube.watch_configmap("web", "cfg"))
        try:
            await c.wait_for(bool)
            await cm.wait_for(lambda d: d == {})
            await poll(lambda: fake.active_watches() == 3, what="three watches")
            await kube.close()
            assert not [t for t in threading.enumerate() if t.name.startswith("kube-watch")]
        finally:
            await kube.close()  # a failure above must not leave threads to later tests
            await c.close()
            await cm.close()

    asyncio.run(scenario())


def test_kubeconfig_from_env_and_context_selection(fake, tmp_path, monkeypatch) -> None:
    import json

    from tests.k8s.conftest import TOKEN, fast_settings
    populate(fake, ["10.1.0.1"])
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "dead",
        "clusters": [{"name": "dead", "cluster": {"server": "http://127.0.0.1:9"}},
                     {"name": "fake", "cluster": {"server": fake.url}}],
        "users": [{"name": "u", "user": {"token": TOKEN}}],
        "contexts": [{"name": "dead", "context": {"cluster": "dead", "user": "u"}},
                     {"name": "live", "context": {"cluster": "fake", "user": "u"}}],
    }
    path = tmp_path / "multi"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("KUBECONFIG", str(path))

    async def main() -> None:
        live = KubeResolvers(fast_settings(None, tmp_path, context="live"))
        found = await live.check_once(WEB, TargetMode.ENDPOINTS)
        assert hosts(found) == ["10.1.0.1:8080"]
        await live.close()
        dead = KubeResolvers(fast_settings(None, tmp_path))  # current-context: unreachable
        with pytest.raises(ResolveError, match=r"127\.0\.0\.1:9"):
            await dead.check_once(WEB, TargetMode.ENDPOINTS)
        await dead.close()

    asyncio.run(main())


def test_an_unreachable_api_is_named_without_the_urls_credentials(tmp_path) -> None:
    # A kubeconfig server URL may carry a user and password: messages show the host only.
    from tests.k8s.conftest import fast_settings, write_kubeconfig

    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        kubeconfig = write_kubeconfig(tmp_path / "kc", f"http://admin:s3cret@127.0.0.1:{port}")

        async def scenario() -> None:
            kube = KubeResolvers(fast_settings(kubeconfig, tmp_path))
            try:
                with pytest.raises(ResolveError) as raised:
                    await kube.check_once(WEB, TargetMode.ENDPOINTS)
            finally:
                await kube.close()
            message = str(raised.value)
            assert f"cannot reach the Kubernetes API at http://127.0.0.1:{port}" in message
            assert "s3cret" not in message and "admin" not in message

        asyncio.run(scenario())
