"""One epoll set for every relay and pending connect of an event loop.

asyncio's ``add_reader``/``remove_reader`` cost several Python calls and a ``Handle`` each, and
every readiness event becomes a scheduled callback. A proxy registers and unregisters sockets
on every connection and on every backpressure transition, so the data plane keeps its own
epoll set, watched by the loop as a single descriptor: registering is a dictionary update
and one ``epoll_ctl``, an event is a direct call. Level-triggered, like the loop's own.
"""

from __future__ import annotations

import asyncio
import select
import weakref
from collections.abc import Callable

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_ERR = select.EPOLLERR | select.EPOLLHUP
#: Events handled per wake-up; the rest wait for the next turn of the loop (fairness).
MAX_EVENTS = 512

Callback = Callable[[], None]


class Poller:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, Callback] = {}
        self._writers: dict[int, Callback] = {}
        self._failures: dict[int, Callback] = {}
        """Sockets watched for errors only (a half-closed side): the kernel reports EPOLLERR
        and EPOLLHUP even for a registration asking for no event."""
        self._masks: dict[int, int] = {}
        """The registered events of each fd in the epoll set (0: errors only)."""
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def add_reader(self, fd: int, callback: Callback) -> None:
        """Read ``fd`` (a reader also hears its failures: any failure watch on it ends)."""
        self._readers[fd] = callback
        self._failures.pop(fd, None)
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            self._update(fd)

    def reader_to_failure_watch(self, fd: int, callback: Callback) -> None:
        """Stop reading ``fd`` (its end of stream was read) but call ``callback`` if it fails
        later (a reset, keepalive giving up): one ``epoll_ctl``, as ``remove_reader``."""
        self._readers.pop(fd, None)
        self._failures[fd] = callback
        self._update(fd)

    def end_failure_watch(self, fd: int) -> None:
        if self._failures.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._writers.pop(fd, None) is not None:
            self._update(fd)

    def take_writer(self, fd: int) -> None:
        """Drop ``fd``'s writer callback but leave the kernel's registration as it is: the
        caller registers a reader next (a connected socket becomes a relay's source), which
        turns the writer's registration into the reader's with one ``epoll_ctl(MOD)``
        instead of a DEL and an ADD. Until then a write event for ``fd`` finds no callback
        and is ignored."""
        self._writers.pop(fd, None)

    def discard(self, fd: int) -> None:
        """Forget ``fd``; call just before closing it. No ``epoll_ctl(DEL)``: closing the
        socket takes it out of the set (its only descriptor: sockets are never duplicated,
        and child processes are started with fork+exec), which saves a system call for
        each of a connection's sockets."""
        self._readers.pop(fd, None)
        self._writers.pop(fd, None)
        self._failures.pop(fd, None)
        self._masks.pop(fd, None)

    def _update(self, fd: int) -> None:
        mask = (_IN if fd in self._readers else 0) | (_OUT if fd in self._writers else 0)
        old = self._masks.get(fd)
        if not mask and fd not in self._failures:
            if old is not None:
                del self._masks[fd]
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass  # already closed: the kernel dropped it from the set
            return
        if mask == old:
            return
        self._masks[fd] = mask
        if old is not None:
            try:
                self._epoll.modify(fd, mask)
                return
            except FileNotFoundError:
                pass  # a socket closed while registered, its number now reused
        self._epoll.register(fd, mask)

    def _dispatch(self) -> None:
        readers, writers, failures = self._readers, self._writers, self._failures
        # Callbacks are looked up before any runs: a callback may close a socket and a new one
        # may reuse its number within this batch; the identity checks below keep a stale
        # event from reaching the new owner.
        batch = [(readers.get(fd), writers.get(fd), fd, events,
                  failures.get(fd) if events & _ERR else None)
                 for fd, events in self._epoll.poll(0, MAX_EVENTS)]
        for reader, writer, fd, events, failure in batch:
            if reader is not None and events & (_IN | _ERR) and readers.get(fd) is reader:
                reader()
            if writer is not None and events & (_OUT | _ERR) and writers.get(fd) is writer:
                writer()
            if failure is not None and failures.get(fd) is failure:
                failure()

    def close(self) -> None:
        self._epoll.close()


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller] = (
    weakref.WeakKeyDictionary())


def poller_for(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's poller, created on first use (one per loop, so per worker process)."""
    poller = _POLLERS.get(loop)
    if poller is None:
        poller = _POLLERS[loop] = Poller(loop)
    return poller
