"""Listening on an interface's addresses, following them as they come and go.

The netlink watcher yields full snapshots of the interface; this module diffs them and
opens or closes one listener per address on each of the forward's engines. Closing a
listener leaves its open TCP connections to finish (the engine keeps its relays).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from portproxy.config import Settings
from portproxy.errors import BindError, PortproxyError, SetupError
from portproxy.netlink import (
    AddressSnapshot,
    CreatedInterface,
    NoLinkDriver,
    WrongLinkKind,
    create_dummy_interface,
    interface_addresses,
    interface_exists,
)
from portproxy.spec import ListenAddress

log = logging.getLogger("portproxy.interface")

RETRY_FIRST = 0.5
"""Seconds before an address the interface lists, but that could not be listened on, is
tried again; the wait doubles up to ``RETRY_MAX`` while it keeps failing."""
RETRY_MAX = 30.0


class Engine(Protocol):
    def add_listener(self, host: str, freebind: bool = False) -> None: ...

    def remove_listener(self, host: str) -> None: ...


class InterfaceBinding:
    """Keeps one listener per current address of ``listen.host`` on every engine."""

    def __init__(self, forward: str, listen: ListenAddress, engines: Sequence[Engine],
                 wait: bool, on_detail: Callable[[str], None],
                 itself: tuple[str, int] | None = None) -> None:
        """``itself``: the forward's static target, which none of the listeners may be
        (the parser refuses it for a literal listen address; an interface's addresses are
        only known here)."""
        self.itself = itself
        self.forward = forward
        self.listen = listen
        self.engines = engines
        self.wait = wait
        self.on_detail = on_detail
        self.bound: set[str] = set()
        self.unbound: dict[str, str] = {}
        """Addresses of the interface not listened on, and why ('' when the address left
        between the read and the bind): retried until bound or gone."""
        self._gap = asyncio.Event()
        """Set while ``unbound`` is not empty: the retry loop re-reads the interface."""
        self._applied = 0
        """Snapshots applied so far: a re-read overtaken by the watcher is dropped."""
        self._detail = ""

    def bind_now(self) -> None:
        """At start-up: bind what exists (errors exit 3), or wait if allowed."""
        name = self.listen.host
        if not interface_exists(name):
            if not self.wait:
                raise SetupError(f"forward {self.forward}: interface {name} does not exist; "
                                 "add ,wait-interface to wait for it")
            self._set_detail(f"waiting for interface {name}")
            return
        self._converge(set(interface_addresses(name, self.listen.family)), True, strict=True)

    async def follow(self) -> None:
        from portproxy.netlink import watch_addresses

        retrying = asyncio.create_task(self._retry_unbound(), name=f"rebind {self.forward}")
        try:
            async for snapshot in watch_addresses(self.listen.host, self.listen.family):
                self.apply(snapshot)
        finally:
            retrying.cancel()

    async def _retry_unbound(self) -> None:
        """Re-read the interface while an address it lists is not listened on. The watcher
        only reports changes: an address that left between its read and our bind and came
        back before the next read (a VIP re-applied), or a port another program held, would
        otherwise stay unserved until something else on the interface changed."""
        from portproxy.netlink import read_snapshot

        delay = RETRY_FIRST
        while True:
            if not self._gap.is_set():
                delay = RETRY_FIRST
                await self._gap.wait()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            if not self._gap.is_set():
                continue
            applied = self._applied
            try:
                snapshot = await read_snapshot(self.listen.host, self.listen.family)
            except (PortproxyError, OSError) as exc:  # netlink busy, out of descriptors
                log.debug("forward %s: re-reading %s failed: %s", self.forward,
                          self.listen.host, exc, extra={"forward": self.forward})
                continue
            if self._applied == applied:  # else the watcher applied a newer snapshot
                self.apply(snapshot)

    def apply(self, snapshot: AddressSnapshot) -> None:
        self._applied += 1
        wanted = set(snapshot.addresses) if snapshot.exists else set()
        self._converge(wanted, snapshot.exists, strict=False)

    def _converge(self, wanted: set[str], exists: bool, strict: bool) -> None:
        name = self.listen.host
        for address in sorted(self.bound - wanted):
            for engine in self.engines:
                engine.remove_listener(address)
            self.bound.discard(address)
            log.info("forward %s: %s left %s; its listener closed", self.forward, address,
                     name, extra={"forward": self.forward})
        for address in sorted(wanted - self.bound):
            try:
                if self.itself is not None and _same_ip(address, self.itself[0]) and \
                        self.listen.port == self.itself[1]:
                    raise SetupError(f"forward {self.forward}: {address} of {name} is the "
                                     "forward's own target: every client would loop back "
                                     "into it; use another port or target")
                for engine in self.engines:
                    engine.add_listener(address)
            except SetupError as exc:
                for engine in self.engines:
                    engine.remove_listener(address)
                self._not_bound(address, exc, strict)
                continue
            self.bound.add(address)
            self.unbound.pop(address, None)
        for address in set(self.unbound) - wanted:
            del self.unbound[address]
        if self.unbound:
            self._gap.set()
        else:
            self._gap.clear()
        failed = sorted(why for why in self.unbound.values() if why)
        if not exists:
            self._set_detail(f"waiting for interface {name}")
        elif failed:  # already in the log, as an error
            self._set_detail("; ".join(failed) + " (retrying)", say=False)
        elif not self.bound:
            self._set_detail(f"waiting for an address on interface {name}")
        else:
            self._set_detail("")

    def _not_bound(self, address: str, exc: SetupError, strict: bool) -> None:
        if isinstance(exc, BindError) and exc.errno == errno.EADDRNOTAVAIL:
            # Listed by the read, gone at the bind: the interface changed under us (not
            # the user's mistake, whatever the bind's message says). The retry finds it
            # back, or the next read no longer lists it.
            if self.unbound.get(address) != "":  # once, not at every retry
                log.info("forward %s: %s left %s before it could be listened on",
                         self.forward, address, self.listen.host,
                         extra={"forward": self.forward})
            self.unbound[address] = ""
            return
        if strict:
            raise exc
        why = str(exc).removeprefix(f"forward {self.forward}: ")
        if self.unbound.get(address) != why:  # once per address and reason, not per try
            log.error("%s (retrying while %s has that address)", exc, self.listen.host,
                      extra={"forward": self.forward})
        self.unbound[address] = why

    def _set_detail(self, detail: str, say: bool = True) -> None:
        """What /readyz shows for the forward; said in the log too when it starts waiting
        (an interface without a usable address otherwise leaves no trace but /readyz)."""
        if say and detail and detail != self._detail:
            log.warning("forward %s: %s (not listening until then)", self.forward, detail,
                        extra={"forward": self.forward})
        self._detail = detail
        self.on_detail(detail)


def _same_ip(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


@contextlib.contextmanager
def vip_interface(settings: Callable[[], Settings]) -> Iterator[CreatedInterface | None]:
    """``--create-interface``: the link with its VIPs for the life of the block (None when
    not asked for), then removed unless another process still uses it (judged with the
    ports of the forwards ``settings()`` has at exit: a reload may change them). During a
    rolling update with maxSurge the new instance adopts the link the old one created; the
    old one, exiting last, must leave it to the new one."""
    name = settings().create_interface
    if name is None:
        yield None
        return
    created = create_vip_interface(name, settings().interface_addresses)
    log.info("interface %s %s with %s", name,
             "created" if created.created_link else "adopted", ", ".join(created.cidrs))
    try:
        yield created
    finally:
        release_vip_interface(created, {f.listen.port for f in settings().forwards})


def release_vip_interface(created: CreatedInterface, ports: set[int]) -> None:
    from portproxy.netlink import interface_addresses, remove_created
    from portproxy.proc_net import read_listening

    try:
        addresses = set(interface_addresses(created.name)) | set(created.addresses)
    except SetupError:  # gone already: nothing of it is in use
        addresses = set()
    users = in_use(addresses, ports, read_listening())
    if users:
        log.info("interface %s left in place: another process listens on %s (an instance "
                 "that adopted it)", created.name, ", ".join(users))
        return
    remove_created(created)
    log.info("removed what was created for interface %s", created.name)


def in_use(addresses: set[str], ports: set[int], listening: set[tuple[str, int]]
           ) -> list[str]:
    """The listeners (``host:port``, sorted) that use a link with ``addresses``: bound to
    one of them, or to a wildcard on one of ``ports`` (another instance of this
    configuration, listening on every address, the link's included). Called once this
    instance's own sockets are closed."""
    wildcards = {"0.0.0.0", "::"}
    return sorted(f"{host}:{port}" for host, port in listening
                  if host in addresses or (host in wildcards and port in ports))


def create_vip_interface(name: str, cidrs: Sequence[str]) -> CreatedInterface:
    """A dummy link holding node-local VIPs (the NodeLocal DNSCache pattern).

    Kernels built without the dummy driver get a port-less bridge instead, which holds
    local addresses the same way. Such a bridge, left by an earlier run or held by a running
    instance, is adopted like a dummy; any other existing link (a bridge with ports, a
    physical link) is someone else's and never adopted.
    """
    try:
        return create_dummy_interface(name, cidrs)
    except WrongLinkKind as exc:
        if exc.existing != "bridge":
            raise
        # What the fallback below made, on a kernel without the dummy driver: an earlier
        # run's (a restart) or a running instance's (a rolling update). Adopted if it has
        # no ports; a bridge with ports is someone else's.
        return create_dummy_interface(name, cidrs, kind="bridge")
    except NoLinkDriver as first:
        try:
            created = create_dummy_interface(name, cidrs, kind="bridge")
        except SetupError:
            raise first from None
        log.warning("no dummy link driver: interface %s is a port-less bridge instead", name)
        return created
