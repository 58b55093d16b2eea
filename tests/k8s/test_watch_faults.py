"""The watch survives what real API servers do: drops, stalls, 410s, restarts, outages."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from portproxy.metrics import ProxyMetrics
from portproxy.resolve.kube_informer import Backoff
from portproxy.resolve.kubernetes import KubeResolvers, KubeSettings
from portproxy.spec import ServiceTarget, TargetMode
from tests.k8s.conftest import (
    Collector,
    ep,
    fast_settings,
    hosts,
    poll,
    write_kubeconfig,
)
from tests.k8s.fakeapi import FakeKube

WEB = ServiceTarget("web", "frontend", "http")
PORTS = [{"name": "http", "port": 80}]
SLICE_PORTS = [{"name": "http", "port": 8080}]
ONE = ["10.1.0.1:8080"]
TWO = ["10.1.0.1:8080", "10.1.0.2:8080"]


def set_ready(fake: FakeKube, *ips: str) -> None:
    fake.endpoint_slice("web", "frontend", "frontend-abc", [ep(ip) for ip in ips], SLICE_PORTS)


Scenario = Callable[[Collector, ProxyMetrics], Coroutine[Any, Any, None]]


def run_following(fake: FakeKube, settings: KubeSettings, scenario: Scenario) -> None:
    """Start with one ready endpoint, follow it, run ``scenario``, clean up."""
    fake.service("web", "frontend", PORTS)
    set_ready(fake, "10.1.0.1")

    async def main() -> None:
        metrics = ProxyMetrics()
        kube = KubeResolvers(settings, metrics)
        c = Collector(kube.resolver(WEB, TargetMode.ENDPOINTS).watch())
        try:
            await c.wait_for(lambda s: hosts(s) == ONE)
            await poll(lambda: fake.active_watches() == 2, what="both watches open")
            await scenario(c, metrics)
            # Never an empty or partial snapshot along the way: the last known set served.
            assert all(len(s) >= 1 for s in c.snapshots), c.snapshots
        finally:
            await c.close()
            await kube.close()

    asyncio.run(main())


def restarts(metrics: ProxyMetrics) -> float:
    return metrics.kube_watch_restarts.labels("web/frontend").value


def test_dropped_stream_reconnects_and_catches_up(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        watches = fake.count("watch", "endpointslices")
        fake.drop_watches()
        set_ready(fake, "10.1.0.1", "10.1.0.2")  # while disconnected: replayed from history
        await c.wait_for(lambda s: hosts(s) == TWO)
        assert fake.count("watch", "endpointslices") > watches
        assert fake.count("list", "endpointslices") == 1  # resumed, not relisted
        assert restarts(metrics) >= 1

    run_following(fake, settings, scenario)


def test_stalled_stream_is_abandoned_after_the_read_timeout(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        assert fake.stall_watches() == 2
        set_ready(fake, "10.1.0.1", "10.1.0.2")  # held back by the stalled stream
        # read timeout = watchTimeout 2 s + request timeout 1 s; then a new watch replays it.
        await c.wait_for(lambda s: hosts(s) == TWO, timeout=15)
        assert restarts(metrics) >= 1
        assert fake.count("list", "endpointslices") == 1

    run_following(fake, settings, scenario)


def test_server_timeout_rewatches_from_the_last_resource_version(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        first = fake.count("watch", "endpointslices")
        await poll(lambda: fake.count("watch", "endpointslices") >= first + 2,
                   what="two server-side timeouts (2 s each)")
        set_ready(fake, "10.1.0.1", "10.1.0.2")
        await c.wait_for(lambda s: hosts(s) == TWO)
        assert restarts(metrics) == 0  # a clean timeout is not a failure
        assert fake.count("list", "endpointslices") == 1

    run_following(fake, settings, scenario)


def test_410_error_event_relists_and_rebuilds(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        fake.configmap("web", "noise", {})  # the client's resourceVersion falls behind...
        fake.compact()  # ...and history up to now is gone
        fake.drop_watches()
        # Deleted and re-added while history is gone: only a relist can see the result.
        fake.endpoint_slice("web", "frontend", "frontend-new", [ep("10.1.0.2")], SLICE_PORTS)
        await c.wait_for(lambda s: hosts(s) == TWO)
        await poll(lambda: fake.count("list", "endpointslices") == 2, what="one relist")
        set_ready(fake, "10.1.0.3")
        await c.wait_for(lambda s: hosts(s) == ["10.1.0.2:8080", "10.1.0.3:8080"])

    run_following(fake, settings, scenario)


def test_410_as_http_status_relists(tmp_path: Path) -> None:
    with FakeKube(gone_as_http=True).serving() as fake:
        settings = fast_settings(write_kubeconfig(tmp_path / "kc", fake.url), tmp_path)

        async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
            fake.configmap("web", "noise", {})
            fake.compact()
            fake.drop_watches()
            set_ready(fake, "10.1.0.1", "10.1.0.2")
            await c.wait_for(lambda s: hosts(s) == TWO)
            assert fake.count("list", "endpointslices") >= 2
            assert restarts(metrics) >= 1

        run_following(fake, settings, scenario)


def test_api_restart_with_history_lost(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        fake.stop()
        set_ready(fake, "10.1.0.1", "10.1.0.2")  # changed while the API was down
        fake.compact()
        fake.start()
        await c.wait_for(lambda s: hosts(s) == TWO)
        assert fake.count("list", "endpointslices") >= 2
        assert restarts(metrics) >= 1

    run_following(fake, settings, scenario)


def test_outage_keeps_the_last_endpoints_then_recovers(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        fake.stop()
        before = restarts(metrics)
        await poll(lambda: restarts(metrics) >= before + 3, what="reconnect attempts")
        assert hosts(c.last) == ONE and len(c.snapshots) == 1
        fake.start()
        set_ready(fake, "10.1.0.1", "10.1.0.2")
        await c.wait_for(lambda s: hosts(s) == TWO)

    run_following(fake, settings, scenario)


def test_bookmarks_advance_the_resource_version_and_avoid_a_relist(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        # Unrelated writes move the global resourceVersion past the slice's.
        for i in range(3):
            fake.configmap("web", f"noise-{i}", {"i": str(i)})
        current = str(fake.state.rv)
        fake.send_bookmarks()

        def resumed_from_bookmark() -> bool:
            with fake.cond:
                return any(r.verb == "watch" and r.resource == "endpointslices"
                           and r.query.get("resourceVersion") == current
                           for r in fake.requests)

        await poll(resumed_from_bookmark, what="a watch resumed at the bookmark")
        # History up to now is lost, but the client is already past it: no 410, no relist.
        fake.compact()
        fake.drop_watches()
        set_ready(fake, "10.1.0.1", "10.1.0.2")
        await c.wait_for(lambda s: hosts(s) == TWO)
        assert fake.count("list", "endpointslices") == 1
        assert len(c.snapshots) == 2  # the bookmark itself changed nothing

    run_following(fake, settings, scenario)


def test_forbidden_watch_after_allowed_list_then_granted(fake, settings, caplog) -> None:
    import logging

    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        fake.deny("watch", "endpointslices", "web")
        fake.drop_watches()
        await poll(lambda: restarts(metrics) >= 3, what="retries while forbidden")
        fake.allow("watch", "endpointslices", "web")
        set_ready(fake, "10.1.0.1", "10.1.0.2")
        await c.wait_for(lambda s: hosts(s) == TWO)

    with caplog.at_level(logging.INFO, logger="portproxy.kube"):
        run_following(fake, settings, scenario)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "forbids watch on endpointslices" in errors[0], errors


def test_events_split_across_chunks_are_reassembled(tmp_path: Path) -> None:
    with FakeKube(pieces_per_event=7).serving() as fake:
        settings = fast_settings(write_kubeconfig(tmp_path / "kc", fake.url), tmp_path)

        async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
            set_ready(fake, "10.1.0.1", "10.1.0.2")
            await c.wait_for(lambda s: hosts(s) == TWO)
            fake.send_bookmarks()
            set_ready(fake, "10.1.0.2")
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.2:8080"])
            assert restarts(metrics) == 0  # no line was ever garbled

        run_following(fake, settings, scenario)


def test_error_event_other_than_410_rewatches_without_relist(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        fake.send_error_event(500, "etcdserver: request timed out")
        await poll(lambda: restarts(metrics) >= 1, what="a restart after the ERROR event")
        set_ready(fake, "10.1.0.1", "10.1.0.2")
        await c.wait_for(lambda s: hosts(s) == TWO)
        assert fake.count("list", "endpointslices") == 1

    run_following(fake, settings, scenario)


def test_a_hanging_api_is_bounded_by_the_request_timeout(fake, settings) -> None:
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        fake.hang_requests(True)
        fake.drop_watches()
        watches = fake.count("watch")
        restarts_before = restarts(metrics)
        # The re-watches hang unanswered; each gives up after its read timeout (a watch's is
        # watchTimeout + request timeout = 3 s) and is tried again.
        # Two rounds of both watches: the second round exists only if the first timed out.
        await poll(lambda: fake.count("watch") >= watches + 4, what="timed-out attempts")
        assert restarts(metrics) >= restarts_before + 4  # drop + timed-out round
        set_ready(fake, "10.1.0.1", "10.1.0.2")
        fake.hang_requests(False)
        await c.wait_for(lambda s: hosts(s) == TWO)

    run_following(fake, settings, scenario)


def set_ready_at(fake: FakeKube, *ips: str) -> str:
    """``set_ready``, returning the resourceVersion the change was written at."""
    obj = fake.endpoint_slice("web", "frontend", "frontend-abc", [ep(ip) for ip in ips],
                              SLICE_PORTS)
    return str(obj["metadata"]["resourceVersion"])


def slice_watch_versions(fake: FakeKube) -> list[str | None]:
    """The resourceVersion each endpointslices watch asked for, in request order."""
    with fake.cond:
        return [r.query.get("resourceVersion") for r in fake.requests
                if r.verb == "watch" and r.resource == "endpointslices"]


def test_stream_cut_after_events_resumes_after_them_without_replay(fake, settings) -> None:
    # A stream that breaks after delivering events must keep their resourceVersions (like
    # client-go's reflector): resuming from where it began would replay them, putting an
    # endpoint that is already gone back into the balancing.
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        fake.cut_watches_after("endpointslices", 1)  # every stream breaks after one event
        first = len(slice_watch_versions(fake))
        versions = [set_ready_at(fake, "10.1.0.1", "10.1.0.2"),
                    set_ready_at(fake, "10.1.0.2"),  # 10.1.0.1 removed
                    set_ready_at(fake, "10.1.0.2", "10.1.0.3")]
        await c.wait_for(lambda s: hosts(s) == ["10.1.0.2:8080", "10.1.0.3:8080"], timeout=5,
                         what="each change through its own broken stream")
        await poll(lambda: versions[-1] in slice_watch_versions(fake), timeout=5,
                   what="a watch resumed after the last delivered event")
        # Each retry starts right after the one event the broken stream delivered (a clean
        # end at timeoutSeconds may repeat a version, never go back to an older one).
        resumed = list(dict.fromkeys(slice_watch_versions(fake)[first:]))
        assert resumed == versions, (resumed, versions)
        assert fake.count("list", "endpointslices") == 1  # resumed, never relisted
        assert [hosts(s) for s in c.snapshots] == [
            ONE, TWO, ["10.1.0.2:8080"], ["10.1.0.2:8080", "10.1.0.3:8080"]]

    run_following(fake, settings, scenario)


@dataclass(frozen=True, slots=True)
class RecordingBackoff(Backoff):
    """The real policy, noting the failure count of every delay the informer asks for."""

    asked: list[int] = field(default_factory=list)

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        self.asked.append(failures)
        return Backoff.delay(self, failures, rng)


def test_streams_that_deliver_events_then_break_do_not_grow_the_backoff(tmp_path: Path) -> None:
    # Each stream delivers one event, then breaks: the delivery proves the API healthy, so
    # every retry is a first one (failure count 0), never the tenth of a streak.
    backoff = RecordingBackoff(0.05, 60.0)
    with FakeKube().serving() as fake:
        settings = fast_settings(write_kubeconfig(tmp_path / "kc", fake.url), tmp_path,
                                 backoff=backoff)

        async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
            fake.cut_watches_after("endpointslices", 1)
            before = restarts(metrics)
            for n in range(3, 13):  # ten changes, each delivered by its own broken stream
                set_ready_at(fake, "10.1.0.1", f"10.1.0.{n}")
            await c.wait_for(lambda s: hosts(s) == ["10.1.0.1:8080", "10.1.0.12:8080"],
                             timeout=60, what="ten changes through ten broken streams")
            # The tenth stream breaks just after its event is published: poll for it.
            await poll(lambda: restarts(metrics) >= before + 10, what="a restart per break")
            assert fake.count("list", "endpointslices") == 1

        run_following(fake, settings, scenario)
    assert len(backoff.asked) >= 10 and set(backoff.asked) == {0}, backoff.asked


def test_an_api_whose_resource_versions_went_backwards_is_relisted(fake, settings) -> None:
    # A restored etcd or replaced control plane: the watch cache answers a resumed watch
    # with 504 "Too large resource version"; rewatching from it never ends, a relist does.
    async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
        fake.send_error_event(504, "Too large resource version: 302, current: 102")
        await poll(lambda: fake.count("list", "endpointslices") == 2, what="a relist")
        set_ready(fake, "10.1.0.1", "10.1.0.2")
        await c.wait_for(lambda s: hosts(s) == TWO)

    run_following(fake, settings, scenario)


@dataclass(frozen=True, slots=True)
class OutageBackoff(Backoff):
    """The real policy, noting each delay that a watch asks for after the API answered it.

    Attributed per watch (each runs in its own thread, named after its query): a watch whose
    request failed in the outage asks for its delay after the failure, which may be after the
    API is back; only a delay asked once the API has seen that watch's own request since it
    came back is one that the answer caused."""

    fake: FakeKube | None = None
    back_from: list[int] = field(default_factory=list)  # index in fake.requests at restart
    asked_after_an_answer: list[tuple[str, int]] = field(default_factory=list)

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        assert self.fake is not None
        resource = threading.current_thread().name.split()[1].split(".")[0]
        with self.fake.cond:
            if self.back_from and any(r.resource == resource
                                      for r in self.fake.requests[self.back_from[0]:]):
                self.asked_after_an_answer.append((resource, failures))
        return Backoff.delay(self, failures, rng)


def test_the_410_that_ends_an_outage_relists_at_once(tmp_path: Path) -> None:
    # The outage's failures used to carry over: the 410 answering the first watch after it
    # counted as one failure more, and waited a backoff near the cap before the relist.
    fake = FakeKube()
    backoff = OutageBackoff(0.02, 0.2, fake)
    with fake.serving():
        settings = fast_settings(write_kubeconfig(tmp_path / "kc", fake.url), tmp_path,
                                 backoff=backoff)

        async def scenario(c: Collector, metrics: ProxyMetrics) -> None:
            fake.stop()
            before = restarts(metrics)
            await poll(lambda: restarts(metrics) >= before + 3, what="failed attempts")
            set_ready(fake, "10.1.0.1", "10.1.0.2")
            fake.compact()
            with fake.cond:
                backoff.back_from.append(len(fake.requests))
            fake.start()
            await c.wait_for(lambda s: hosts(s) == TWO)
            # Only the outage's attempts waited; nothing waited once the API answered.
            assert backoff.asked_after_an_answer == []

        run_following(fake, settings, scenario)
