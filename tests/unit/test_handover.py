"""The hand-over from a forward a reload replaced to its successors on the same port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from portproxy.endpoints import BalancePolicy, Balancer, Endpoint, EndpointSet
from portproxy.forward_runtime import ForwardRuntime, Handover
from portproxy.resolve.static import StaticResolver
from portproxy.spec import HostTarget, parse_forward
from portproxy.target import TargetState

SPEC = "tcp://127.0.0.1:8080=10.0.0.1:80"


def runtime(spec: str = SPEC) -> ForwardRuntime:
    forward = parse_forward(spec)
    assert isinstance(forward.target, HostTarget)
    target = TargetState(forward.name, StaticResolver(forward.target),
                         Balancer(BalancePolicy.ROUND_ROBIN))
    return ForwardRuntime(forward, target)


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop run until ``predicate()`` holds (fails after ``timeout`` seconds)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def test_retires_once_every_successor_resolved() -> None:
    async def scenario() -> None:
        old, first, second = runtime(), runtime(), runtime(SPEC + ",idle-timeout=1m")
        retired: list[ForwardRuntime] = []
        handover = Handover(old, [first, second], retired.append)
        first.target.update(EndpointSet.of([Endpoint("10.0.0.1", 80)]))
        await asyncio.sleep(0)
        assert retired == []  # one successor still cannot listen
        second.target.update(EndpointSet.of([Endpoint("10.0.0.1", 80)]))
        assert retired == [old] and handover.done
        handover.finish()  # idempotent: stopping later does not retire it twice
        second.target.update(EndpointSet.of([Endpoint("10.0.0.2", 80)]))
        assert retired == [old]
        assert not first.target._listeners and not second.target._listeners

    asyncio.run(scenario())


def test_a_successor_that_never_resolves_does_not_keep_the_old_forward() -> None:
    async def scenario() -> None:
        old, successor = runtime(), runtime()
        retired: list[ForwardRuntime] = []
        Handover(old, [successor], retired.append, timeout=0.05)
        await until(lambda: retired == [old])
        assert not successor.target._listeners

    asyncio.run(scenario())


def test_finish_retires_at_once_when_stopping() -> None:
    async def scenario() -> None:
        old, successor = runtime(), runtime()
        retired: list[ForwardRuntime] = []
        handover = Handover(old, [successor], retired.append)
        handover.finish()
        assert retired == [old]
        successor.target.update(EndpointSet.of([Endpoint("10.0.0.1", 80)]))
        assert retired == [old]

    asyncio.run(scenario())


def test_two_forwards_replaced_by_successors_with_the_same_targets_both_retire() -> None:
    """tcp://:53 and udp://:53 both replaced: two hand-overs wait on the same successor
    targets; the first to finish must not make the update skip the second."""
    async def scenario() -> None:
        old_tcp, old_udp, successor = runtime(), runtime(), runtime()
        retired: list[ForwardRuntime] = []
        Handover(old_tcp, [successor], retired.append)
        Handover(old_udp, [successor], retired.append)
        successor.target.update(EndpointSet.of([Endpoint("10.0.0.1", 80)]))
        assert retired == [old_tcp, old_udp]

    asyncio.run(scenario())
