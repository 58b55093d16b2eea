"""Scale up and down under live traffic through the real TCP engine: zero failed connections.

Each backend pod is an echo server on its own port (its own EndpointSlice: the per-pod
targetPort case). A graceful scale-down is what Kubernetes does: the endpoint turns
not-ready/terminating (or its slice goes away) and only then does the pod stop listening.
"""

from __future__ import annotations

import asyncio
import logging
import os

from portproxy.endpoints import BalancePolicy, Balancer
from portproxy.limits import SharedLimit
from portproxy.metrics import ProxyMetrics
from portproxy.relay import direction_type
from portproxy.resolve.kubernetes import KubeResolvers
from portproxy.spec import (
    Forward,
    ForwardOptions,
    ListenAddress,
    Protocol,
    ServiceTarget,
    TargetMode,
)
from portproxy.target import TargetState
from portproxy.tcp import TcpForwarder
from tests.k8s.conftest import ep, poll
from tests.k8s.fakeapi import FakeKube

MAX_CONNECTIONS = 3000  # bound on the whole test's load
WORKERS = 4


class Pod:
    """An echo backend on 127.0.0.1:<own port>, counting the connections it served."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.served = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._echo, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.served += 1
        try:
            data = await reader.read()  # until the client's FIN
            writer.write(data)
            await writer.drain()
        finally:
            writer.close()

    def stop_listening(self) -> None:
        assert self.server is not None
        self.server.close()  # in-flight connections finish; new ones would be refused

    def publish(self, fake: FakeKube, ready: bool = True) -> None:
        endpoint = ep("127.0.0.1") if ready else ep("127.0.0.1", ready=False, terminating=True)
        fake.endpoint_slice("web", "frontend", f"frontend-{self.name}", [endpoint],
                            [{"name": "http", "port": self.port, "protocol": "TCP"}])


class Traffic:
    """Clients that keep opening connections through the proxy and check every byte."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failed: list[str] = []
        self.stop = asyncio.Event()
        self.tasks = [asyncio.ensure_future(self._client(i)) for i in range(WORKERS)]

    async def _client(self, worker: int) -> None:
        while not self.stop.is_set() and self.ok + len(self.failed) < MAX_CONNECTIONS:
            payload = os.urandom(2048) + f"worker {worker} #{self.ok}".encode()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", self.port), 10)
                writer.write(payload)
                writer.write_eof()
                echoed = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                if echoed == payload:
                    self.ok += 1
                else:
                    self.failed.append(f"{len(echoed)} bytes back of {len(payload)}")
            except (OSError, TimeoutError) as exc:
                self.failed.append(repr(exc))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)


async def served_more(pods: list[Pod], count: int) -> None:
    start = {p.name: p.served for p in pods}
    await poll(lambda: all(p.served >= start[p.name] + count for p in pods), timeout=20,
               what=f"traffic to {[p.name for p in pods]}")


def test_scale_up_and_down_during_live_traffic_fails_no_connection(fake, settings,
                                                                   caplog) -> None:
    fake.service("web", "frontend", [{"name": "http", "port": 80, "targetPort": "http"}])
    forward = Forward("test", (Protocol.TCP,), ListenAddress("ip", "127.0.0.1", 0),
                      ServiceTarget("web", "frontend", "http"), ForwardOptions(name="web"))

    async def main() -> None:
        pods = {name: Pod(name) for name in ("a", "b", "c")}
        for pod in pods.values():
            await pod.start()
        pods["a"].publish(fake)
        kube = KubeResolvers(settings)
        target = TargetState("web", kube.resolver(forward.target, TargetMode.ENDPOINTS),
                             Balancer(BalancePolicy.ROUND_ROBIN))
        follow = asyncio.ensure_future(target.follow())
        engine = TcpForwarder(forward, target, ProxyMetrics(), direction_type(False),
                              SharedLimit(0))
        traffic: Traffic | None = None
        try:
            engine.add_listener("127.0.0.1")
            await poll(lambda: len(target.endpoints) == 1, what="first endpoints")
            traffic = Traffic(engine.listeners["127.0.0.1"].getsockname()[1])
            await served_more([pods["a"]], 20)

            pods["b"].publish(fake)  # scale up
            pods["c"].publish(fake)
            await poll(lambda: len(target.endpoints) == 3, what="three endpoints")
            await served_more([pods["a"], pods["b"], pods["c"]], 10)

            pods["a"].publish(fake, ready=False)  # scale down: terminating first...
            await poll(lambda: pods["a"].port not in {e.port for e in target.endpoints.endpoints},
                       what="a removed")
            pods["a"].stop_listening()  # ...then the pod goes away
            fake.delete("endpointslices", "web", "frontend-b")  # slice gone, pod still up
            await poll(lambda: len(target.endpoints) == 1, what="b removed")
            pods["b"].stop_listening()
            await served_more([pods["c"]], 20)
            await traffic.finish()
        finally:
            if traffic is not None:
                traffic.stop.set()
                await asyncio.gather(*traffic.tasks, return_exceptions=True)
            await engine.drain(0)
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
            await kube.close()
            for pod in pods.values():
                if pod.server is not None:
                    pod.server.close()
        assert traffic.failed == [], traffic.failed[:5]
        assert traffic.ok >= 60

    with caplog.at_level(logging.WARNING, logger="portproxy.tcp"):
        asyncio.run(main())
    # Not even a retried connect attempt: removals reached the engine before pods stopped.
    assert not [r for r in caplog.records if r.name == "portproxy.tcp"], caplog.records
