"""One worker process of ``--workers``: the data plane, fed by its supervisor.

The worker runs a ``Daemon`` with its own listeners (SO_REUSEPORT) but no admin endpoint,
VIP interface or API watches: its settings and every endpoint change arrive over the
link from the supervisor, and it reports readiness, then metric snapshots and statuses
each second. It drains and leaves when the supervisor is gone. ``workers.py`` starts it
as ``python -m portproxy.worker_process FD``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import replace

from portproxy.config import Settings
from portproxy.daemon import Daemon
from portproxy.endpoints import EndpointSet
from portproxy.errors import PortproxyError
from portproxy.spec import Forward
from portproxy.worker_link import Link

# The supervisor's logger name: one name for everything --workers logs, whichever process.
log = logging.getLogger("portproxy.workers")

STATS_INTERVAL = 1.0
"""Seconds between a worker's metric reports; the resolution of /metrics with workers."""


class FedResolver:
    """A resolver whose snapshots come from the supervisor."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self._queue: asyncio.Queue[EndpointSet] = asyncio.Queue()

    def push(self, endpoints: EndpointSet) -> None:
        self._queue.put_nowait(endpoints)

    def describe(self) -> str:
        return str(self.forward.target)

    async def watch(self) -> AsyncIterator[EndpointSet]:
        while True:
            yield await self._queue.get()


def worker_settings(settings: Settings) -> Settings:
    """What a worker runs: the data plane only; the supervisor keeps the rest."""
    return replace(settings, admin_address=None, create_interface=None,
                   interface_addresses=(), workers=1, tcp_services_configmap=None,
                   udp_services_configmap=None, ready_file=None)


def _reload_through_supervisor() -> Settings:
    """A SIGHUP sent to a worker itself (``kill -HUP`` on the wrong PID): say where it
    belongs, rather than the flags-only "needs --config" line, which would be wrong here."""
    raise PortproxyError(f"worker {os.getpid()} takes reloads from its supervisor: send "
                         f"SIGHUP to PID {os.getppid()}")


class _WorkerField(logging.Filter):
    """Adds ``worker=N`` to every line of worker N: with --workers each forward's lines
    (listening, interface changes, access log) come once per worker."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


async def worker_main(fd: int, index: int = 0) -> int:
    link = Link(socket.socket(fileno=fd))
    kind, settings = await link.receive()
    assert kind == "settings"
    from portproxy.logs import setup_logging

    limiter = setup_logging(settings.log_level, settings.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(index))
    # By forward, not by name: while a reload replaces a forward, the old one and its
    # successor (one name, maybe two targets) each follow their own target.
    fed: dict[Forward, FedResolver] = {}

    def factory(forward: Forward) -> FedResolver:
        resolver = fed[forward] = FedResolver(forward)
        return resolver

    daemon = Daemon(worker_settings(settings), resolver_factory=factory,
                    reloader=_reload_through_supervisor)
    ready = asyncio.Event()
    orphaned = asyncio.Event()

    def supervisor_gone() -> None:
        if orphaned.is_set():
            return
        orphaned.set()
        log.warning("worker %d: the supervisor is gone; draining and leaving", os.getpid())
        # Only a first request: while draining already (the supervisor passed SIGTERM on,
        # then died) another would count as the second signal and reset every connection.
        if not daemon.stopping:
            daemon.request_stop()

    async def listen() -> None:
        try:
            while True:
                message = await link.receive()
                if message[0] == "endpoints" and message[1] in fed:
                    fed[message[1]].push(message[2])
                elif message[0] == "settings":
                    # A reload sent while this worker starts: its first forwards come first.
                    await ready.wait()
                    if daemon.stopping:  # neither applied nor refused: it is leaving
                        await link.send("draining")
                        continue
                    before = set(fed)
                    refusal = daemon.apply(worker_settings(message[1]))
                    # Refused forwards never run; removed ones drain on the endpoints they
                    # have, as the supervisor stops resolving their targets.
                    keep = before if refusal is not None else set(message[1].forwards)
                    for forward in set(fed) - keep:
                        del fed[forward]
                    await link.send("applied", refusal)
        except (EOFError, OSError, pickle.UnpicklingError):
            # A supervisor killed with our reports unread in its socket shows up as
            # ECONNRESET rather than EOF.
            supervisor_gone()

    async def report() -> None:
        await ready.wait()
        try:
            await link.send("ready", os.getpid())
            while True:
                await link.send("stats", daemon.metrics.registry.snapshot(),
                                daemon.forward_statuses())
                await asyncio.sleep(STATS_INTERVAL)
        except OSError:
            supervisor_gone()

    tasks = [asyncio.create_task(listen(), name="supervisor link"),
             asyncio.create_task(report(), name="worker report"),
             asyncio.create_task(limiter.flush_periodically(), name="log summaries")]
    try:
        await daemon.run(ready=ready.set)
    except PortproxyError as exc:
        await link.send("failed", str(exc))
        return 3
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await link.send("stats", daemon.metrics.registry.snapshot(), [])
        limiter.flush(everything=True)
    return 0


def main() -> None:
    """Entry point of a worker process (started by the supervisor, in its own session so a
    terminal's Ctrl-C reaches only the supervisor, which forwards one signal)."""
    from portproxy.loop import install_fast_loop

    install_fast_loop()
    sys.exit(asyncio.run(worker_main(int(sys.argv[1]), int(sys.argv[2]))))


if __name__ == "__main__":
    main()
