"""mode=clusterip: the Service's ClusterIP:port, headless refused, ExternalName through DNS."""

from __future__ import annotations

import asyncio
import logging

import pytest

from portproxy.resolve.kubernetes import KubeResolvers, KubeSettings
from portproxy.spec import ServiceTarget, TargetMode
from tests.k8s.conftest import Collector, hosts
from tests.k8s.fakeapi import FakeKube

PORTS = [{"name": "dns", "port": 53, "protocol": "UDP"},
         {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
         {"name": "metrics", "port": 9153, "protocol": "TCP"}]


def follow(settings: KubeSettings, target: ServiceTarget, mode: TargetMode, steps) -> None:
    async def main() -> None:
        kube = KubeResolvers(settings)
        c = Collector(kube.resolver(target, mode).watch())
        try:
            await steps(c)
        finally:
            await c.close()
            await kube.close()
    asyncio.run(main())


def test_cluster_ip_by_name_and_number_follows_service_changes(fake: FakeKube,
                                                               settings) -> None:
    fake.service("kube-system", "kube-dns", PORTS, cluster_ip="10.96.0.10")
    target = ServiceTarget("kube-system", "kube-dns", "metrics")

    async def steps(c: Collector) -> None:
        await c.wait_for(lambda s: hosts(s) == ["10.96.0.10:9153"])
        # The Service port is renumbered: followed through the Service watch.
        fake.service("kube-system", "kube-dns",
                     [*PORTS[:2], {"name": "metrics", "port": 9253}], cluster_ip="10.96.0.10")
        await c.wait_for(lambda s: hosts(s) == ["10.96.0.10:9253"])
        # Dual-stack ClusterIPs: both families.
        fake.service("kube-system", "kube-dns", [*PORTS[:2], {"name": "metrics", "port": 9253}],
                     cluster_ip="10.96.0.10", clusterIPs=["10.96.0.10", "fd00:96::a"])
        await c.wait_for(lambda s: len(s) == 2)
        assert hosts(c.last) == ["10.96.0.10:9253", "[fd00:96::a]:9253"]
        assert fake.count("list", "endpointslices") == 0  # clusterip needs no slices

    follow(settings, target, TargetMode.CLUSTERIP, steps)
    assert KubeResolvers(settings).resolver(target, TargetMode.CLUSTERIP).describe() == \
        "kube-system/kube-dns:metrics (clusterip)"


def test_cluster_ip_by_number(fake: FakeKube, settings) -> None:
    fake.service("kube-system", "kube-dns", PORTS, cluster_ip="10.96.0.10")

    async def steps(c: Collector) -> None:
        await c.wait_for(lambda s: hosts(s) == ["10.96.0.10:53"])

    follow(settings, ServiceTarget("kube-system", "kube-dns", 53), TargetMode.CLUSTERIP, steps)


def test_headless_is_an_error_suggesting_endpoints_mode(fake: FakeKube, settings,
                                                        caplog) -> None:
    fake.service("db", "postgres", [{"name": "pg", "port": 5432}], cluster_ip="None")

    async def steps(c: Collector) -> None:
        await c.wait_for(lambda s: len(s) == 0)
        # Turned into a normal Service: it recovers without a restart.
        fake.service("db", "postgres", [{"name": "pg", "port": 5432}], cluster_ip="10.96.5.5")
        await c.wait_for(lambda s: hosts(s) == ["10.96.5.5:5432"])

    with caplog.at_level(logging.WARNING, logger="portproxy.kube"):
        follow(settings, ServiceTarget("db", "postgres", "pg"), TargetMode.CLUSTERIP, steps)
    lines = [r.getMessage() for r in caplog.records]
    assert any("headless" in m and "mode=endpoints" in m for m in lines), lines


def test_external_name_resolves_by_dns_in_both_modes(fake: FakeKube, settings) -> None:
    fake.apply("services", {"metadata": {"namespace": "ext", "name": "db"},
                            "spec": {"type": "ExternalName", "externalName": "localhost.",
                                     "ports": [{"name": "pg", "port": 5432}]}})
    for mode in (TargetMode.CLUSTERIP, TargetMode.ENDPOINTS):
        async def steps(c: Collector) -> None:
            snapshot = await c.wait_for(bool)
            assert "127.0.0.1:5432" in hosts(snapshot)

        follow(settings, ServiceTarget("ext", "db", "pg"), mode, steps)

    async def steps_by_number(c: Collector) -> None:
        snapshot = await c.wait_for(bool)
        assert "127.0.0.1:6000" in hosts(snapshot)

    follow(settings, ServiceTarget("ext", "db", 6000), TargetMode.CLUSTERIP, steps_by_number)


# The second name has a 64-character label: the API server accepts it (it checks no label
# lengths in externalName), and the IDNA codec refuses it before any lookup.
@pytest.mark.parametrize("bad_name", ["no-such-host.invalid", "a" * 64 + ".example.com"],
                         ids=["nxdomain", "label-too-long"])
def test_external_name_that_does_not_resolve_yields_nothing_then_follows_a_fix(
        fake: FakeKube, settings, caplog, bad_name: str) -> None:
    fake.apply("services", {"metadata": {"namespace": "ext", "name": "db"},
                            "spec": {"type": "ExternalName", "externalName": bad_name}})

    async def steps(c: Collector) -> None:
        from tests.k8s.conftest import poll
        # The host's resolver answers for the .invalid name: 10 s (glibc: 5 s, twice) where
        # its nameserver does not answer, and a lookup in flight finishes before the next.
        await poll(lambda: any(f"cannot resolve ExternalName {bad_name}" in r.getMessage()
                               for r in caplog.records), timeout=30, what="the DNS failure")
        assert not c.snapshots
        fake.apply("services", {"metadata": {"namespace": "ext", "name": "db"},
                                "spec": {"type": "ExternalName", "externalName": "localhost"}})
        snapshot = await c.wait_for(bool, timeout=30)
        assert "127.0.0.1:5432" in hosts(snapshot)

    with caplog.at_level(logging.WARNING, logger="portproxy.kube"):
        follow(settings, ServiceTarget("ext", "db", 5432), TargetMode.CLUSTERIP, steps)
