"""Fixtures: a running fake API server, a kubeconfig pointing at it, fast client settings."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from portproxy.endpoints import EndpointSet
from portproxy.resolve.kube_informer import Backoff
from portproxy.resolve.kubernetes import KubeSettings
from tests.k8s.fakeapi import FakeKube
from tests.net.harness import EchoServer

TOKEN = "test-token"


@pytest.fixture
def fake() -> Iterator[FakeKube]:
    # serving() fails the test at teardown if a handler raised anything other than a
    # client going away: a bug in the fake must not pass as a flaky client.
    with FakeKube(token=TOKEN).serving() as api:
        yield api


@pytest.fixture
def backends() -> Iterator[tuple[EchoServer, EchoServer]]:
    """Two TCP echo backends, to tell which one a forward uses."""
    first, second = EchoServer(), EchoServer()
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def write_kubeconfig(path: Path, server: str, token: str = TOKEN,
                     context: str = "fake") -> Path:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": "fake", "user": "fake"}}],
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture
def settings(fake: FakeKube, tmp_path: Path) -> KubeSettings:
    return fast_settings(write_kubeconfig(tmp_path / "kubeconfig", fake.url), tmp_path)


def fast_settings(kubeconfig: Path | None, tmp_path: Path, **overrides: Any) -> KubeSettings:
    """Short timeouts so fault scenarios finish in seconds (the defaults are minutes)."""
    values: dict[str, Any] = {
        "kubeconfig": str(kubeconfig) if kubeconfig else None,
        "serviceaccount_dir": str(tmp_path / "no-serviceaccount"),
        "request_timeout": 1.0, "watch_timeout_seconds": 2,
        "backoff": Backoff(0.02, 0.2), "dns_interval": 0.2,
    }
    values.update(overrides)
    return KubeSettings(**values)


class Collector:
    """Consumes a resolver's ``watch()`` in a task and keeps every snapshot."""

    def __init__(self, iterator: AsyncIterator[Any]) -> None:
        self.snapshots: list[Any] = []
        self._changed = asyncio.Event()
        self._task = asyncio.ensure_future(self._consume(iterator))

    async def _consume(self, iterator: AsyncIterator[Any]) -> None:
        async for snapshot in iterator:
            self.snapshots.append(snapshot)
            self._changed.set()

    @property
    def last(self) -> Any:
        return self.snapshots[-1] if self.snapshots else None

    async def wait_for(self, predicate: Callable[[Any], bool], timeout: float = 10.0,
                       what: str = "snapshot") -> Any:
        deadline = time.monotonic() + timeout
        while not (self.snapshots and predicate(self.snapshots[-1])):
            if self._task.done():
                self._task.result()
                raise AssertionError("the watch ended")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; got {self.snapshots}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.1))
            except TimeoutError:
                pass
        return self.snapshots[-1]

    async def close(self) -> None:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass


def hosts(snapshot: EndpointSet) -> list[str]:
    return [str(e) for e in snapshot.endpoints]


async def poll(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "it") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def ep(ip: str, ready: bool | None = True, terminating: bool | None = None,
       node: str | None = None) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    if ready is not None:
        conditions["ready"] = ready
    if terminating is not None:
        conditions["terminating"] = terminating
        conditions["serving"] = True
    out: dict[str, Any] = {"addresses": [ip], "conditions": conditions}
    if node:
        out["nodeName"] = node
    return out


def readyz(admin: int) -> tuple[int, str]:
    """The admin endpoint's /readyz answer: (status, body), or (0, "") while it does not
    listen yet."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except urllib.error.URLError:
        return 0, ""
