"""Node networking through rtnetlink: interface addresses, address-change events, dummy VIPs.

This is the only module that imports pyroute2; everything it returns is a plain frozen
dataclass or a string.  It always works on the network namespace of the calling process.

Which addresses count as an interface's addresses (``interface_addresses``, snapshots):
  * IPv6 link-local addresses (fe80::/10) are left out: binding one needs a scope id, and a
    listener on them is almost never what "listen on eth0" means.  IPv4 link-local
    (169.254.0.0/16) is kept: it is the NodeLocal DNSCache VIP range.
  * IPv6 addresses that are still tentative (duplicate address detection running) or whose
    DAD failed are left out: bind() on them fails with EADDRNOTAVAIL.  A tentative address
    shows up in a later snapshot, when the kernel announces that DAD succeeded.

Every pyroute2 call here runs on a private event loop (``netlink_runner``); the caller's
loop, maybe uvloop, only ever sees the plain stdlib socket of ``netlink_events``, which
says when a watched interface may have changed.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pyroute2 import AsyncIPRoute
from pyroute2.netlink import NLM_F_DUMP_INTR
from pyroute2.netlink.exceptions import NetlinkError

from portproxy.errors import ConfigError, SetupError
from portproxy.netlink_events import open_event_socket, wait_relevant
from portproxy.netlink_runner import netlink_executor, run_blocking, run_private
from portproxy.spec_values import check_interface_name

Family = Literal["any", "ipv4", "ipv6"]
"""Which address families of an interface to use: both, or one of them."""

_IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# linux/if_addr.h and linux/if.h: a stable kernel ABI.
_IFA_F_NODAD = 0x02
_IFA_F_DADFAILED = 0x08
_IFA_F_TENTATIVE = 0x40
_IFF_UP = 0x1
_LINK_LOCAL_V6 = ipaddress.ip_network("fe80::/10")

_DUMP_ATTEMPTS = 5
"""Re-dumps when the kernel flags a dump as interrupted by a concurrent change."""


OWNER_ALIAS = "portproxy --create-interface"
"""The alias (``ip link`` shows it) of links portproxy created, which it may remove."""


class WrongLinkKind(SetupError):
    """An interface of the requested name exists and is of another kind (``existing``)."""

    def __init__(self, message: str, existing: str) -> None:
        super().__init__(message)
        self.existing = existing


class NoLinkDriver(SetupError):
    """The kernel cannot create links of the requested kind (e.g. built without ``dummy``):
    the one failure where trying another kind makes sense."""


@dataclass(frozen=True, slots=True)
class AddressSnapshot:
    """The state of one interface at one moment, as the listener layer needs it."""

    interface: str
    exists: bool
    """False while no interface has this name (not created yet, deleted, renamed away)."""
    up: bool
    """IFF_UP is set. Informational: addresses of a down interface can still be bound."""
    index: int | None
    """Kernel interface index; None when the interface does not exist."""
    addresses: frozenset[str]
    """Usable addresses (see the module docstring), as canonical strings without prefix."""

    def sorted_addresses(self) -> list[str]:
        """The addresses IPv4 first, each family in numeric order."""
        return _sort_addresses(self.addresses)


@dataclass(frozen=True, slots=True)
class CreatedInterface:
    """What ``create_dummy_interface`` did, so that ``remove_created`` undoes only that."""

    name: str
    index: int
    kind: str
    created_link: bool
    """True if the link was created here (removal deletes it); False if it was adopted."""
    cidrs: tuple[str, ...]
    """Every requested address as canonical ``ip/prefix``, whether added here or not."""
    added_cidrs: tuple[str, ...]
    """The addresses this call added; on an adopted link only these are removed again."""
    owned: bool = False
    """The link carries the alias portproxy gives the links it creates: adopted from an
    earlier instance (a rolling update's predecessor), it is removed like a created one."""

    @property
    def deletes_link(self) -> bool:
        return self.created_link or self.owned

    @property
    def addresses(self) -> tuple[str, ...]:
        """The requested addresses without prefix: what to listen on."""
        return tuple(cidr.partition("/")[0] for cidr in self.cidrs)


# ---------------------------------------------------------------------------- public API


def interface_exists(name: str) -> bool:
    """Whether an interface with this name exists in the current network namespace.

    Like every function here, a name the kernel would refuse is a ConfigError."""
    check_interface_name(name)
    return run_blocking(lambda: _read_snapshot(name, "any")).exists


def interface_addresses(name: str, family: Family = "any") -> list[str]:
    """The usable addresses of ``name`` (IPv4 first); SetupError if it does not exist."""
    check_interface_name(name)
    snapshot = run_blocking(lambda: _read_snapshot(name, family))
    if not snapshot.exists:
        raise SetupError(f"interface {name!r} does not exist")
    return snapshot.sorted_addresses()


async def read_snapshot(name: str, family: Family = "any") -> AddressSnapshot:
    """The current state of ``name``, without blocking the caller's event loop."""
    check_interface_name(name)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        netlink_executor(), run_private, lambda: _read_snapshot(name, family)
    )


async def watch_addresses(name: str, family: Family = "any") -> AsyncIterator[AddressSnapshot]:
    """Yield the state of ``name`` now and again each time it changes.

    The first snapshot comes at once (also when the interface does not exist); later ones
    only when it differs from the one before.  Each snapshot is a full re-read of the
    kernel's state, triggered by RTM_NEWADDR/DELADDR/NEWLINK/DELLINK events: the events
    only say *when* to look, so a lost or coalesced event cannot leave a stale set behind.
    Close it with ``contextlib.aclosing`` or by cancelling the task that iterates it; either
    way the netlink socket is closed.
    """
    check_interface_name(name)
    loop = asyncio.get_running_loop()
    # Subscribe before the first read, so that no change can slip between read and watch.
    sock = open_event_socket(ipv4=family != "ipv6", ipv6=family != "ipv4")
    try:
        last: AddressSnapshot | None = None
        while True:
            snapshot = await read_snapshot(name, family)
            if snapshot != last:
                last = snapshot
                yield snapshot
            await wait_relevant(loop, sock, snapshot.index)
    finally:
        sock.close()


def create_dummy_interface(
    name: str, cidrs: Sequence[str], *, kind: str = "dummy"
) -> CreatedInterface:
    """Create (or adopt) link ``name``, set it up and add ``cidrs`` to it.

    An existing link of the same kind is adopted; an existing link of another kind is an
    error (it is someone else's).  Addresses that are already there are fine and are not
    removed later.  IPv6 addresses are added without DAD, so they can be bound at once.
    A bare address means a host route (/32, /128).  ``kind`` is the rtnetlink link kind:
    ``dummy`` for node-local VIPs; another kind is only for kernels built without the
    dummy driver.  On failure, whatever was done is undone.  Needs NET_ADMIN.
    """
    check_interface_name(name)
    wanted = _parse_cidrs(cidrs)
    return run_blocking(lambda: _create(name, wanted, kind))


def remove_created(created: CreatedInterface) -> None:
    """Undo ``create_dummy_interface``: delete the link if it was created (or adopted
    with portproxy's alias), else the addresses it added.  Things already gone are fine;
    other failures raise SetupError after everything else was tried."""
    run_blocking(lambda: _remove(created))


# ------------------------------------------------------------------ pure helpers


def _parse_cidrs(cidrs: Sequence[str]) -> tuple[_IPInterface, ...]:
    parsed = []
    for cidr in cidrs:
        try:
            parsed.append(ipaddress.ip_interface(cidr))
        except ValueError as exc:
            raise ConfigError(f"invalid interface address {cidr!r}: {exc}") from None
    return tuple(dict.fromkeys(parsed))


def _sort_addresses(addresses: frozenset[str]) -> list[str]:
    parsed = (ipaddress.ip_address(a) for a in addresses)
    return [str(a) for a in sorted(parsed, key=lambda a: (a.version, int(a)))]


def _usable_address(
    family_number: int, address: str | None, flags: int, family: Family
) -> str | None:
    """The canonical address if a listener can bind it and ``family`` wants it, else None."""
    if address is None:
        return None
    ip = ipaddress.ip_address(address)
    if (family == "ipv4" and ip.version != 4) or (family == "ipv6" and ip.version != 6):
        return None
    if family_number == socket.AF_INET6 and (
        ip in _LINK_LOCAL_V6 or flags & (_IFA_F_TENTATIVE | _IFA_F_DADFAILED)
    ):
        return None
    return str(ip)


# ---------------------------------------------------------------- pyroute2 calls


def _setup_error(name: str, action: str, exc: NetlinkError | OSError, kind: str = "") -> SetupError:
    code = exc.code if isinstance(exc, NetlinkError) else exc.errno
    if code in (errno.EPERM, errno.EACCES):
        reason = "operation not permitted (needs the NET_ADMIN capability)"
    elif code == errno.EOPNOTSUPP and kind:
        reason = f"the kernel has no {kind!r} link driver (module not loaded?)"
        return NoLinkDriver(f"cannot {action} interface {name!r}: {reason}")
    else:
        reason = os.strerror(code) if isinstance(code, int) else str(exc)
    return SetupError(f"cannot {action} interface {name!r}: {reason}")


async def _get_link(ipr: Any, name: str) -> Any:
    """The RTM_NEWLINK message of ``name``, or None if there is no such interface."""
    try:
        return (await ipr.link("get", ifname=name))[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


async def _read_snapshot(name: str, family: Family) -> AddressSnapshot:
    try:
        async with AsyncIPRoute(groups=0) as ipr:
            link = await _get_link(ipr, name)
            if link is None:
                return AddressSnapshot(name, False, False, None, frozenset())
            index = int(link["index"])
            for _ in range(_DUMP_ATTEMPTS):
                messages = [msg async for msg in await ipr.addr("dump", index=index)]
                if not any(msg["header"]["flags"] & NLM_F_DUMP_INTR for msg in messages):
                    break
    except (NetlinkError, OSError) as exc:
        raise _setup_error(name, "read", exc) from exc
    addresses = set()
    for msg in messages:
        if msg["index"] != index:
            continue
        flags = msg.get("IFA_FLAGS") or msg["flags"]  # IFA_FLAGS holds all 32 bits
        # IFA_LOCAL is the local end on point-to-point links; IFA_ADDRESS the peer there.
        address = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        usable = _usable_address(msg["family"], address, flags, family)
        if usable is not None:
            addresses.add(usable)
    up = bool(link["flags"] & _IFF_UP)
    return AddressSnapshot(name, True, up, index, frozenset(addresses))


async def _add_address(ipr: Any, index: int, iface: _IPInterface) -> bool:
    """Add one address; False if it was already there."""
    flags = _IFA_F_NODAD if iface.version == 6 else 0
    try:
        await ipr.addr(
            "add",
            index=index,
            address=str(iface.ip),
            prefixlen=iface.network.prefixlen,
            flags=flags,
        )
    except NetlinkError as exc:
        if exc.code == errno.EEXIST:
            return False
        raise
    return True


async def _create(
    name: str,
    wanted: tuple[_IPInterface, ...],
    kind: str,
) -> CreatedInterface:
    try:
        async with AsyncIPRoute(groups=0) as ipr:
            link = await _get_link(ipr, name)
            created_link = link is None
            if link is None:
                await ipr.link("add", ifname=name, kind=kind)
                link = await _get_link(ipr, name)
                if link is None:
                    raise SetupError(f"interface {name!r} vanished right after its creation")
            else:
                existing = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
                if existing != kind:
                    raise WrongLinkKind(
                        f"interface {name!r} exists and is a {existing or 'physical'} link,"
                        f" not a {kind}: refusing to adopt it", existing or "physical"
                    )
                if kind == "bridge" and await _has_ports(ipr, int(link["index"])):
                    # A port-less bridge only stands in for a dummy; one with ports is a
                    # real bridge, someone else's.
                    raise SetupError(f"interface {name!r} is a bridge with ports: refusing "
                                     "to adopt it")
            index = int(link["index"])
            owned = created_link or link.get("ifalias") == OWNER_ALIAS
            added: list[str] = []
            try:
                if created_link:  # marked, so that an instance adopting it may remove it
                    await ipr.link("set", index=index, ifalias=OWNER_ALIAS)
                await ipr.link("set", index=index, state="up")
                for iface in wanted:
                    if await _add_address(ipr, index, iface):
                        added.append(iface.with_prefixlen)
            except BaseException:
                partial = CreatedInterface(name, index, kind, created_link, (), tuple(added))
                await _undo(ipr, partial)
                raise
    except (NetlinkError, OSError) as exc:
        raise _setup_error(name, "create", exc, kind) from exc
    cidrs = tuple(iface.with_prefixlen for iface in wanted)
    return CreatedInterface(name, index, kind, created_link, cidrs, tuple(added), owned)


async def _has_ports(ipr: Any, index: int) -> bool:
    """Whether any link is enslaved to link ``index`` (a bridge's ports)."""
    found = False
    async for link in await ipr.link("dump"):
        found = found or link.get("master") == index
    return found


async def _undo(ipr: Any, created: CreatedInterface) -> list[NetlinkError]:
    """Delete what ``created`` says was created; return the failures other than 'gone'."""
    failures: list[NetlinkError] = []
    gone = (errno.ENODEV, errno.EADDRNOTAVAIL)
    if created.deletes_link:
        try:
            await ipr.link("del", index=created.index)
        except NetlinkError as exc:
            if exc.code not in gone:
                failures.append(exc)
        return failures
    for cidr in created.added_cidrs:
        iface = ipaddress.ip_interface(cidr)
        try:
            await ipr.addr(
                "del", index=created.index, address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                break  # the link is gone and took every address with it
            if exc.code not in gone:
                failures.append(exc)
    return failures


async def _remove(created: CreatedInterface) -> None:
    try:
        async with AsyncIPRoute(groups=0) as ipr:
            failures = await _undo(ipr, created)
    except (NetlinkError, OSError) as exc:
        raise _setup_error(created.name, "remove", exc) from exc
    if failures:
        raise _setup_error(created.name, "remove", failures[0])
