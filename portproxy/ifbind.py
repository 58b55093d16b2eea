"""Listening on an interface's addresses, following them as they come and go.

The netlink watcher yields full snapshots of the interface; this module diffs them and
opens or closes one listener per address on each of the forward's engines. Closing a
listener leaves its open TCP connections to finish (the engine keeps its relays).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from portproxy.errors import SetupError
from portproxy.netlink import (
    AddressSnapshot,
    CreatedInterface,
    NoLinkDriver,
    create_dummy_interface,
    interface_addresses,
    interface_exists,
)
from portproxy.spec import ListenAddress

log = logging.getLogger("portproxy.interface")


class Engine(Protocol):
    def add_listener(self, host: str, freebind: bool = False) -> None: ...

    def remove_listener(self, host: str) -> None: ...


class InterfaceBinding:
    """Keeps one listener per current address of ``listen.host`` on every engine."""

    def __init__(self, forward: str, listen: ListenAddress, engines: Sequence[Engine],
                 wait: bool, on_detail: Callable[[str], None]) -> None:
        self.forward = forward
        self.listen = listen
        self.engines = engines
        self.wait = wait
        self.on_detail = on_detail
        self.bound: set[str] = set()
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

        async for snapshot in watch_addresses(self.listen.host, self.listen.family):
            self.apply(snapshot)

    def apply(self, snapshot: AddressSnapshot) -> None:
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
                for engine in self.engines:
                    engine.add_listener(address)
            except SetupError as exc:
                for engine in self.engines:
                    engine.remove_listener(address)
                if strict:
                    raise
                log.error("%s", exc, extra={"forward": self.forward})
                continue
            self.bound.add(address)
        if not exists:
            self._set_detail(f"waiting for interface {name}")
        elif not self.bound:
            self._set_detail(f"waiting for an address on interface {name}")
        else:
            self._set_detail("")

    def _set_detail(self, detail: str) -> None:
        """What /readyz shows for the forward; said in the log too when it starts waiting
        (an interface without a usable address otherwise leaves no trace but /readyz)."""
        if detail and detail != self._detail:
            log.warning("forward %s: %s (not listening until then)", self.forward, detail,
                        extra={"forward": self.forward})
        self._detail = detail
        self.on_detail(detail)



def create_vip_interface(name: str, cidrs: Sequence[str]) -> CreatedInterface:
    """A dummy link holding node-local VIPs (the NodeLocal DNSCache pattern).

    Kernels built without the dummy driver get a port-less bridge instead, which holds
    local addresses the same way. Only a missing driver falls back: an existing link of
    another kind (someone else's bridge) is never adopted.
    """
    try:
        return create_dummy_interface(name, cidrs)
    except NoLinkDriver as first:
        try:
            created = create_dummy_interface(name, cidrs, kind="bridge")
        except SetupError:
            raise first from None
        log.warning("no dummy link driver: interface %s is a port-less bridge instead", name)
        return created
