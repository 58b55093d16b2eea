"""Static and DNS resolvers: snapshots, re-resolution, keeping the last good answer."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.resolve.dns import DnsResolver, system_lookup
from portproxy.resolve.static import StaticResolver
from portproxy.spec import HostTarget


async def next_snapshot(it: AsyncIterator[EndpointSet], timeout: float = 5.0) -> EndpointSet:
    return await asyncio.wait_for(anext(it), timeout)


def test_static_ipv4_yields_once_and_runs_until_cancelled() -> None:
    async def main() -> None:
        resolver = StaticResolver(HostTarget("10.0.0.10", 53))
        assert resolver.describe() == "10.0.0.10:53"
        it = resolver.watch()
        assert await next_snapshot(it) == EndpointSet.of([Endpoint("10.0.0.10", 53)])
        pending = asyncio.ensure_future(anext(it))
        await asyncio.sleep(0)
        assert not pending.done()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending

    asyncio.run(main())


def test_static_ipv6_is_normalised() -> None:
    async def main() -> None:
        resolver = StaticResolver(HostTarget("FD00:0::1", 8080))
        snapshot = await next_snapshot(resolver.watch())
        assert [str(e) for e in snapshot.endpoints] == ["[fd00::1]:8080"]

    asyncio.run(main())


def test_system_lookup_of_localhost_and_literals() -> None:
    async def main() -> None:
        assert "127.0.0.1" in await system_lookup("localhost")
        assert await system_lookup("::1") == ["::1"]
        with pytest.raises(socket.gaierror):
            await system_lookup("no-such-host.invalid")

    asyncio.run(main())


def test_dns_resolver_real_lookup_gives_every_address() -> None:
    async def main() -> None:
        resolver = DnsResolver(HostTarget("localhost", 8080), interval=30.0)
        it = resolver.watch()
        try:
            snapshot = await next_snapshot(it)
        finally:
            await it.aclose()  # type: ignore[attr-defined]
        hosts = {e.host for e in snapshot.endpoints}
        assert "127.0.0.1" in hosts
        assert all(e.port == 8080 for e in snapshot.endpoints)
        assert hosts == set(await system_lookup("localhost"))

    asyncio.run(main())


class ScriptedLookup:
    """Each lookup takes the next scripted answer (a list of IPs or an exception)."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[list[str] | OSError] = asyncio.Queue()
        self.calls = 0

    async def __call__(self, host: str) -> list[str]:
        assert host == "db.internal"
        answer = await self.answers.get()
        self.calls += 1
        if isinstance(answer, OSError):
            raise answer
        return answer


def test_dns_changes_are_followed_and_failures_keep_the_last_good(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        lookup = ScriptedLookup()
        resolver = DnsResolver(HostTarget("db.internal", 5432), interval=0.001, lookup=lookup)
        it = resolver.watch()
        try:
            lookup.answers.put_nowait(["10.0.0.2", "10.0.0.1"])
            first = await next_snapshot(it)
            assert [str(e) for e in first.endpoints] == ["10.0.0.1:5432", "10.0.0.2:5432"]
            # Two failures, the same answer again (no new snapshot), then a change.
            for answer in (socket.gaierror(-2, "Name or service not known"),
                           socket.gaierror(-3, "Temporary failure"),
                           ["10.0.0.1", "10.0.0.2"], ["fd00::5", "10.0.0.1"]):
                lookup.answers.put_nowait(answer)
            second = await next_snapshot(it)
            assert [str(e) for e in second.endpoints] == ["10.0.0.1:5432", "[fd00::5]:5432"]
            assert lookup.calls == 5
        finally:
            await it.aclose()  # type: ignore[attr-defined]

    with caplog.at_level(logging.INFO, logger="portproxy.dns"):
        asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one line per failure streak, not per retry
    assert "keeping 2 known endpoint(s)" in warnings[0].getMessage()
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_dns_never_resolved_yields_nothing_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def nxdomain(host: str) -> list[str]:
        # Not the host's resolver: where its nameserver does not answer, each lookup of
        # even a .invalid name takes 10 s (glibc: 5 s, twice), the whole deadline below.
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def main() -> None:
        resolver = DnsResolver(HostTarget("no-such-host.invalid", 80), interval=0.05,
                               lookup=nxdomain)
        task = asyncio.ensure_future(anext(resolver.watch()))
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while not any("no-such-host.invalid" in r.getMessage() for r in caplog.records):
                assert asyncio.get_running_loop().time() < deadline, "no warning logged"
                await asyncio.sleep(0.01)
            assert not task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.WARNING, logger="portproxy.dns"):
        asyncio.run(main())
    assert "no endpoints" in caplog.records[0].getMessage()
