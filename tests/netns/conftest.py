"""Fixtures for tests that need their own network namespace (root; skipped otherwise).

- ``netns``: a fresh namespace with lo up; every process started through it and the
  namespace itself are removed after the test, whatever happened.
- ``veth``: ``netns`` plus a veth pair ``ppx0``/``ppx1``, both ends in it and up.
- ``vip_kind``: the link kind to use for "dummy" VIP interfaces: ``dummy``, or ``bridge``
  (a port-less bridge behaves alike for local addresses) on kernels built without the
  dummy driver, so the create/adopt/remove logic is still exercised there.

End-to-end tests reuse them, e.g. ``veth.ns.popen([sys.executable, "-m", "portproxy", ...])``
for the daemon and ``veth.ns.run_python(client_code)`` for a client.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.netns import nsutil


@dataclass(frozen=True)
class Veth:
    ns: nsutil.NetNamespace
    left: str
    right: str


@pytest.fixture(scope="session")
def _netns_available() -> None:
    reason = nsutil.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    nsutil.sweep_stale()


@pytest.fixture
def netns(_netns_available: None) -> Iterator[nsutil.NetNamespace]:
    try:
        context = nsutil.netns()
        ns = context.__enter__()
    except nsutil.NetnsUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield ns
    finally:
        context.__exit__(None, None, None)


@pytest.fixture
def veth(netns: nsutil.NetNamespace) -> Veth:
    netns.add_veth("ppx0", "ppx1")
    return Veth(netns, "ppx0", "ppx1")


@pytest.fixture
def vip_kind(netns: nsutil.NetNamespace) -> str:
    return "dummy" if netns.supports_link_kind("dummy") else "bridge"
