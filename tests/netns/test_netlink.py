"""portproxy.netlink against a real kernel, inside namespaces created by the tests.

The code under test runs in the namespace as a subprocess; the namespace is changed with
``ip -n`` from outside and checked against the kernel's own view (``ip -j``).
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

import pytest

from tests.netns import nsutil
from tests.netns.conftest import Veth

pytestmark = pytest.mark.root

WATCH = [sys.executable, "-m", "tests.netns.watch_probe"]


def call(ns: nsutil.NetNamespace, expr: str, setup: str = "") -> Any:
    """Evaluate ``expr`` with portproxy.netlink imported as ``nl``, inside ``ns``.

    Returns its JSON value, or ``{"error": class name, "message": text}`` if it raised a
    PortproxyError.
    """
    code = f"""
import dataclasses, json
from portproxy import netlink as nl
from portproxy.errors import PortproxyError
{setup}
try:
    value = {expr}
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
except PortproxyError as exc:
    value = {{"error": type(exc).__name__, "message": str(exc)}}
print(json.dumps(value))
"""
    return json.loads(ns.run_python(code).stdout)


def created_setup(created: dict[str, Any]) -> str:
    """Code rebuilding a CreatedInterface (as returned by ``call``) as ``created``."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in created.items()}
    return f"created = nl.CreatedInterface(**{fields!r})"


def kernel_addresses(ns: nsutil.NetNamespace, ifname: str) -> dict[str, dict[str, Any]]:
    return {entry["local"]: entry for entry in ns.addresses(ifname)}


def link_exists(ns: nsutil.NetNamespace, ifname: str) -> bool:
    return any(link["ifname"] == ifname for link in json.loads(ns.ip("-j", "link", "show")))


# ---------------------------------------------------------------- reading addresses


def test_addresses_listed_by_family_without_ipv6_link_local(veth: Veth) -> None:
    ns = veth.ns
    ns.ip("addr", "add", "10.20.0.1/24", "dev", "ppx0")
    ns.ip("addr", "add", "10.20.0.2/32", "dev", "ppx0")
    ns.ip("addr", "add", "fd00:20::1/64", "dev", "ppx0", "nodad")
    # A permanent (non-tentative) link-local address: present, usable, yet left out.
    ns.ip("addr", "add", "fe80::1234/64", "dev", "ppx0", "nodad")
    ns.ip("addr", "add", "169.254.20.10/32", "dev", "ppx0")
    assert "fe80::1234" in kernel_addresses(ns, "ppx0")

    every, ipv4, ipv6, lo, peer = call(
        ns,
        "[nl.interface_addresses('ppx0'), nl.interface_addresses('ppx0', 'ipv4'),"
        " nl.interface_addresses('ppx0', 'ipv6'), nl.interface_addresses('lo'),"
        " nl.interface_addresses('ppx1')]",
    )
    assert every == ["10.20.0.1", "10.20.0.2", "169.254.20.10", "fd00:20::1"]
    assert ipv4 == ["10.20.0.1", "10.20.0.2", "169.254.20.10"]
    assert ipv6 == ["fd00:20::1"]
    assert lo == ["127.0.0.1", "::1"]
    assert peer == []


def test_missing_interface_is_a_setup_error_naming_it(netns: nsutil.NetNamespace) -> None:
    result = call(netns, "nl.interface_addresses('nosuch0')")
    assert result["error"] == "SetupError"
    assert "'nosuch0'" in result["message"]
    assert call(netns, "[nl.interface_exists('nosuch0'), nl.interface_exists('lo')]") == [
        False,
        True,
    ]


def test_invalid_interface_name_is_a_config_error(netns: nsutil.NetNamespace) -> None:
    result = call(netns, "nl.interface_exists('much-too-long-name0')")
    assert result["error"] == "ConfigError"


def test_tentative_ipv6_address_left_out_until_dad_succeeds(netns: nsutil.NetNamespace) -> None:
    ns = netns
    # A link that never had carrier (its peer never went up) postpones DAD: the address
    # stays tentative until the peer comes up.
    ns.ip("link", "add", "ppx0", "type", "veth", "peer", "name", "ppx1")
    ns.ip("link", "set", "ppx0", "up")
    ns.ip("addr", "add", "fd00:21::1/64", "dev", "ppx0")
    assert kernel_addresses(ns, "ppx0")["fd00:21::1"].get("tentative") is True
    assert call(ns, "nl.interface_addresses('ppx0')") == []

    watcher = ns.popen([*WATCH, "ppx0"])
    first = watcher.expect_json(lambda s: True)
    assert first["addresses"] == []
    ns.ip("link", "set", "ppx1", "up")  # carrier: DAD runs, then the kernel announces it
    watcher.expect_json(lambda s: s["addresses"] == ["fd00:21::1"], timeout=15)
    assert kernel_addresses(ns, "ppx0")["fd00:21::1"].get("tentative") is None


# ---------------------------------------------------------------- watching


def test_watcher_sees_addresses_added_and_removed_and_the_link_go(veth: Veth) -> None:
    ns = veth.ns
    watcher = ns.popen([*WATCH, "ppx0"])
    first = watcher.expect_json(lambda s: True)
    assert first["exists"] is True and first["up"] is True and first["addresses"] == []

    ns.ip("addr", "add", "10.30.0.1/32", "dev", "ppx0")
    watcher.expect_json(lambda s: s["addresses"] == ["10.30.0.1"])
    ns.ip("addr", "add", "fd00:30::1/128", "dev", "ppx0", "nodad")
    watcher.expect_json(lambda s: s["addresses"] == ["10.30.0.1", "fd00:30::1"])
    ns.ip("addr", "del", "10.30.0.1/32", "dev", "ppx0")
    watcher.expect_json(lambda s: s["addresses"] == ["fd00:30::1"])

    ns.ip("link", "set", "ppx0", "down")
    down = watcher.expect_json(lambda s: s["up"] is False)
    assert down["exists"] is True
    ns.ip("link", "del", "ppx0")  # takes ppx1 with it
    gone = watcher.expect_json(lambda s: s["exists"] is False)
    assert gone["addresses"] == [] and gone["index"] is None

    # A new link under the same name is followed too.
    ns.add_veth("ppx0", "ppx1")
    ns.ip("addr", "add", "10.30.0.2/32", "dev", "ppx0")
    back = watcher.expect_json(lambda s: s["addresses"] == ["10.30.0.2"])
    assert back["exists"] is True and back["index"] != first["index"]


def test_watcher_waits_for_an_interface_that_appears_later(netns: nsutil.NetNamespace) -> None:
    watcher = netns.popen([*WATCH, "late0"])
    first = watcher.expect_json(lambda s: True)
    assert first == {"exists": False, "up": False, "index": None, "addresses": []}
    netns.add_veth("late0", "late1")
    netns.ip("addr", "add", "10.31.0.1/32", "dev", "late0")
    seen = watcher.expect_json(lambda s: s["addresses"] == ["10.31.0.1"])
    assert seen["exists"] is True


def test_watcher_restricted_to_ipv4_never_reports_ipv6(veth: Veth) -> None:
    ns = veth.ns
    watcher = ns.popen([*WATCH, "ppx0", "ipv4"])
    watcher.expect_json(lambda s: s["exists"])
    ns.ip("addr", "add", "fd00:32::1/128", "dev", "ppx0", "nodad")
    ns.ip("addr", "add", "10.32.0.1/32", "dev", "ppx0")
    watcher.expect_json(lambda s: s["addresses"] == ["10.32.0.1"])
    assert all("fd00" not in line for line in watcher.seen)


def test_watcher_follows_a_burst_of_changes_to_the_final_state(veth: Veth) -> None:
    ns = veth.ns
    watcher = ns.popen([*WATCH, "ppx0", "ipv4"])
    watcher.expect_json(lambda s: s["exists"])
    wanted = [f"10.33.{i // 250}.{i % 250 + 1}" for i in range(300)]
    batch = "".join(f"addr add {a}/32 dev ppx0\n" for a in wanted)
    ns.run(["ip", "-batch", "-"], input=batch)
    watcher.expect_json(lambda s: sorted(s["addresses"]) == sorted(wanted), timeout=20)
    ns.ip("addr", "flush", "dev", "ppx0")
    watcher.expect_json(lambda s: s["addresses"] == [], timeout=20)


def test_watcher_cancellation_closes_its_socket(veth: Veth) -> None:
    code = """
import asyncio, contextlib, json, os
from portproxy.netlink import watch_addresses

def fds():
    return len(os.listdir("/proc/self/fd"))

async def main():
    before = fds()
    first = asyncio.get_running_loop().create_future()

    async def consume():
        async for snapshot in watch_addresses("ppx0"):
            if not first.done():
                first.set_result(snapshot)

    task = asyncio.create_task(consume(), name="watch")
    await first
    during = fds()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    after_cancel = fds()

    async with contextlib.aclosing(watch_addresses("ppx0")) as watch:
        async for _ in watch:
            break
    after_aclose = fds()
    print(json.dumps([before, during, after_cancel, after_aclose, task.cancelled()]))

asyncio.run(main())
"""
    before, during, after_cancel, after_aclose, cancelled = json.loads(
        veth.ns.run_python(code).stdout
    )
    assert during > before  # the watcher's netlink socket was open
    assert after_cancel == before
    assert after_aclose == before
    assert cancelled is True


# ---------------------------------------------------------------- VIP interfaces


def test_create_with_ipv4_and_ipv6_then_remove(netns: nsutil.NetNamespace, vip_kind: str) -> None:
    created = call(
        netns,
        f"nl.create_dummy_interface('ppxvip0', ['169.254.20.10', 'fd00:40::10/128'],"
        f" kind={vip_kind!r})",
    )
    assert created["created_link"] is True
    assert created["cidrs"] == ["169.254.20.10/32", "fd00:40::10/128"]
    assert created["added_cidrs"] == created["cidrs"]

    link = json.loads(netns.ip("-j", "-d", "link", "show", "ppxvip0"))[0]
    assert "UP" in link["flags"]
    assert link["linkinfo"]["info_kind"] == vip_kind
    addresses = kernel_addresses(netns, "ppxvip0")
    assert addresses["169.254.20.10"]["prefixlen"] == 32
    assert addresses["fd00:40::10"]["prefixlen"] == 128
    assert addresses["fd00:40::10"].get("tentative") is None  # added without DAD
    assert call(netns, "nl.interface_addresses('ppxvip0')") == ["169.254.20.10", "fd00:40::10"]
    # Usable at once: a listener binds both.
    bound = netns.run_python(
        "import socket\n"
        "for fam, ip in ((socket.AF_INET, '169.254.20.10'), (socket.AF_INET6, 'fd00:40::10')):\n"
        "    with socket.socket(fam, socket.SOCK_STREAM) as s:\n"
        "        s.bind((ip, 53)); s.listen(); print(s.getsockname()[0])\n"
    )
    assert bound.stdout.split() == ["169.254.20.10", "fd00:40::10"]

    assert call(netns, "nl.remove_created(created)", created_setup(created)) is None
    assert not link_exists(netns, "ppxvip0")


def test_adopt_existing_link_removes_only_what_it_added(
    netns: nsutil.NetNamespace, vip_kind: str
) -> None:
    netns.ip("link", "add", "ppxvip0", "type", vip_kind)
    netns.ip("addr", "add", "169.254.20.10/32", "dev", "ppxvip0")
    created = call(
        netns,
        "nl.create_dummy_interface('ppxvip0', ['169.254.20.10/32', '169.254.20.11/32'],"
        f" kind={vip_kind!r})",
    )
    assert created["created_link"] is False
    assert created["added_cidrs"] == ["169.254.20.11/32"]
    link = json.loads(netns.ip("-j", "link", "show", "ppxvip0"))[0]
    assert "UP" in link["flags"]
    assert set(kernel_addresses(netns, "ppxvip0")) >= {"169.254.20.10", "169.254.20.11"}

    call(netns, "nl.remove_created(created)", created_setup(created))
    assert link_exists(netns, "ppxvip0")
    remaining = kernel_addresses(netns, "ppxvip0")
    assert "169.254.20.10" in remaining
    assert "169.254.20.11" not in remaining


def test_a_link_portproxy_created_is_removed_by_whoever_adopts_it_last(
    netns: nsutil.NetNamespace, vip_kind: str
) -> None:
    first = call(netns, f"nl.create_dummy_interface('ppxvip0', ['10.41.0.1'], kind={vip_kind!r})")
    link = json.loads(netns.ip("-j", "-d", "link", "show", "ppxvip0"))[0]
    assert link.get("ifalias") == "portproxy --create-interface"
    second = call(netns, f"nl.create_dummy_interface('ppxvip0', ['10.41.0.1'], kind={vip_kind!r})")
    assert (second["created_link"], second["owned"]) == (False, True)
    call(netns, "nl.remove_created(created)", created_setup(second))
    assert not link_exists(netns, "ppxvip0")
    assert first["created_link"] is True


def test_remove_tolerates_what_is_already_gone(netns: nsutil.NetNamespace, vip_kind: str) -> None:
    created = call(netns, f"nl.create_dummy_interface('ppxvip0', ['10.41.0.1'], kind={vip_kind!r})")
    netns.ip("link", "del", "ppxvip0")
    assert call(netns, "nl.remove_created(created)", created_setup(created)) is None


def test_refuses_to_adopt_a_link_of_another_kind(veth: Veth) -> None:
    ns = veth.ns
    result = call(ns, "nl.create_dummy_interface('ppx0', ['10.42.0.1'])")
    assert result["error"] == "WrongLinkKind"  # a SetupError: exit 3
    assert "'ppx0'" in result["message"] and "adopt" in result["message"]
    assert "10.42.0.1" not in kernel_addresses(ns, "ppx0")
    assert link_exists(ns, "ppx0")


def test_failure_half_way_undoes_what_was_done(netns: nsutil.NetNamespace, vip_kind: str) -> None:
    # The kernel refuses an IPv6 multicast address after the first address was added.
    result = call(
        netns,
        f"nl.create_dummy_interface('ppxvip0', ['10.43.0.1', 'ff02::5/128'], kind={vip_kind!r})",
    )
    assert result["error"] == "SetupError"
    assert not link_exists(netns, "ppxvip0")

    netns.ip("link", "add", "ppxvip0", "type", vip_kind)
    result = call(
        netns,
        f"nl.create_dummy_interface('ppxvip0', ['10.43.0.1', 'ff02::5/128'], kind={vip_kind!r})",
    )
    assert result["error"] == "SetupError"
    assert link_exists(netns, "ppxvip0")
    assert "10.43.0.1" not in kernel_addresses(netns, "ppxvip0")


def test_without_net_admin_the_error_says_so(netns: nsutil.NetNamespace, vip_kind: str) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("util-linux 'setpriv' is not installed (needed to drop NET_ADMIN)")
    code = f"""
from portproxy import netlink as nl
from portproxy.errors import SetupError
try:
    nl.create_dummy_interface('ppxvip0', ['10.44.0.1'], kind={vip_kind!r})
except SetupError as exc:
    print(exc)
"""
    drop = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
    done = netns.run([*drop, sys.executable, "-c", code])
    assert "NET_ADMIN" in done.stdout
    assert "'ppxvip0'" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    assert not link_exists(netns, "ppxvip0")


def test_missing_dummy_driver_is_a_clear_setup_error(netns: nsutil.NetNamespace) -> None:
    if netns.supports_link_kind("dummy"):
        pytest.skip("this kernel has the dummy driver: the missing-driver error cannot occur")
    result = call(netns, "nl.create_dummy_interface('ppxvip0', ['10.45.0.1'])")
    assert result["error"] == "NoLinkDriver"  # a SetupError: exit 3 if nothing else works
    assert "'dummy'" in result["message"] and "driver" in result["message"]
    assert not link_exists(netns, "ppxvip0")
