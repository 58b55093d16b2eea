"""Moving bytes one way between two non-blocking sockets, driven by the event loop.

A ``Direction`` reads from ``src`` and writes to ``dst`` with callbacks registered on the
loop (no task and no buffer per idle connection). Backpressure: while bytes read from
``src`` are not yet accepted by ``dst``, ``src`` is not read again, so each direction holds
at most one chunk. End of stream on ``src`` becomes ``shutdown(SHUT_WR)`` on ``dst`` once
every byte is delivered (half-close); any error aborts the whole relay.

Two movers share this state machine so their behaviour is identical: ``CopyDirection``
(``recv_into`` a buffer shared by the whole process, then ``send``; its read loop is
written out in one function, for speed, around the same transitions) and, in
``splice.py``, ``SpliceDirection`` (socket → pipe → socket inside the kernel).
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import TYPE_CHECKING

from portproxy.metrics import Counter

if TYPE_CHECKING:
    from portproxy.relay import Relay

#: Reads per readiness callback: several reads per wake-up amortise the loop's overhead on
#: bulk transfers, while a bound keeps one busy connection from starving the others.
READS_PER_WAKEUP = 4

#: The copy pump's buffer. One per process is enough because a chunk is written out in the
#: same callback that read it; only an unsent remainder is copied (rare: a full send buffer).
COPY_CHUNK = 256 * 1024
_shared_buffer = bytearray(COPY_CHUNK)
_shared_view = memoryview(_shared_buffer)


class Direction:
    """src → dst; subclasses implement ``_fill`` (read) and ``_flush`` (write)."""

    __slots__ = (
        "capacity", "chunk", "counter", "done", "dst", "dst_fd", "eof", "loop",
        "nbytes", "poller", "relay", "src", "src_fd", "writing",
    )

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, counter: Counter,
    ) -> None:
        self.relay = relay
        self.loop: asyncio.AbstractEventLoop = relay.loop
        self.poller = relay.poller
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.counter = counter
        self.capacity = COPY_CHUNK
        """Most one read can return; a shorter read means the socket had no more."""
        self.nbytes = 0
        self.eof = False
        self.done = False
        self.writing = False
        self.chunk: memoryview | None = None
        """Copying: bytes read and not yet sent (a copy: the shared buffer is reused)."""

    def start(self) -> None:
        self.poller.add_reader(self.src_fd, self.on_readable)

    def on_readable(self) -> None:
        try:
            for _ in range(READS_PER_WAKEUP):
                n = self._fill()
                if n < 0:
                    return
                if n == 0:
                    self._end_of_stream()
                    return
                self.nbytes += n
                self.counter.value += n
                self.relay.last_activity = self.loop.time()
                if not self._flush():
                    self._wait_writable()
                    return
                if n < self.capacity:
                    # A short read drained the socket: reading again now would only return
                    # EAGAIN (one wasted system call per message on request/response traffic).
                    return
        except OSError as exc:
            self.relay.abort(exc)

    def _end_of_stream(self) -> None:
        if not self.relay.other_done(self):
            # Level-triggered: an unread end of stream would be reported again, so it is no
            # longer read; but a reset after the FIN must still end the connection, or a
            # silent other side would hold it until fin-timeout. When the other side is
            # done the relay closes both sockets now, which takes them out of the epoll set.
            self.poller.reader_to_failure_watch(self.src_fd, self.relay.src_failed)
        self.eof = True
        self._finish()

    def _wait_writable(self) -> None:
        """``dst`` took only part of a chunk: stop reading until it has taken the rest.

        ``src`` stays watched for failures: when the other direction is idle too (its
        source silent, so it does not write to ``src``), nothing else would hear a reset of
        ``src``, and the dead connection would keep its backend and its ``max-conns`` slot
        until the idle timeout. Same number of ``epoll_ctl`` calls as unregistering."""
        self.poller.reader_to_failure_watch(self.src_fd, self._src_failed_while_writing)
        self.poller.add_writer(self.dst_fd, self.on_writable)
        self.writing = True

    def _src_failed_while_writing(self) -> None:
        err = self.src.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.relay.abort(OSError(err, os.strerror(err)))
        else:
            # EPOLLHUP with no error: ``src`` sent its FIN and the other direction already
            # passed one to it, a clean end whose unread data and EOF are read once ``dst``
            # has taken the chunk. Nothing is left to fail; stop hearing it (level-triggered).
            self.poller.end_failure_watch(self.src_fd)

    def on_writable(self) -> None:
        # The peer took bytes since the last attempt, or it would not be writable: traffic,
        # even if what is pending does not all go out now (a slow reader is not idle).
        self.relay.last_activity = self.loop.time()
        try:
            if not self._flush():
                return
            self.poller.remove_writer(self.dst_fd)
            self.writing = False
            self.poller.add_reader(self.src_fd, self.on_readable)
        except OSError as exc:
            self.relay.abort(exc)

    def _finish(self) -> None:
        """End of stream with nothing pending: pass the half-close on.

        When the other direction is already done the relay closes both sockets right away,
        and close() sends the FIN itself (nothing is left unread on either socket), so the
        shutdown() would be a wasted system call.
        """
        if not self.relay.other_done(self):
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is already gone; the other direction will notice
        self.done = True
        self.release()
        self.relay.direction_done()

    def stop(self) -> None:
        """Stop moving bytes (idempotent). The relay closes both sockets right after and
        drops them from the poller without a system call (``Poller.discard``)."""
        self.writing = False
        self.eof = True

    def release(self) -> None:
        """Give back per-transfer resources (pipes); called when finished or aborted."""

    def _fill(self) -> int:
        """Read a chunk: bytes read, 0 at end of stream, -1 if nothing is available."""
        raise NotImplementedError

    def _flush(self) -> bool:
        """Write what is pending; True when nothing is left."""
        raise NotImplementedError


class CopyDirection(Direction):
    """``recv_into``/``send`` through the process-wide buffer; copies only a remainder."""

    __slots__ = ()

    #: A read at least this large makes the direction call ``_on_bulk`` (never, here).
    bulk_read = COPY_CHUNK + 1

    def on_readable(self) -> None:
        """``Direction.on_readable`` with the copy written out in place.

        On request/response traffic this runs once per message, and the generic version
        makes four more Python calls around the same two system calls. The state machine
        is the same (the data-plane suite runs against both movers).
        """
        src, dst = self.src, self.dst
        try:
            for _ in range(READS_PER_WAKEUP):
                try:
                    n = src.recv_into(_shared_buffer)
                except (BlockingIOError, InterruptedError):
                    return
                if not n:
                    self._end_of_stream()
                    return
                self.nbytes += n
                self.counter.value += n
                self.relay.last_activity = self.loop.time()
                try:
                    sent = dst.send(_shared_view[:n])
                except (BlockingIOError, InterruptedError):
                    sent = 0
                if sent != n:
                    # The shared buffer is reused by the next read anywhere: keep a copy.
                    self.chunk = memoryview(bytes(_shared_view[sent:n]))
                    self._wait_writable()
                    return
                if n >= self.bulk_read:
                    self._on_bulk()
                    return
                if n < COPY_CHUNK:
                    return  # a short read drained the socket (see Direction.on_readable)
        except OSError as exc:
            self.relay.abort(exc)

    def _on_bulk(self) -> None:
        """A read of ``bulk_read`` bytes or more was just delivered."""

    def _flush(self) -> bool:
        chunk = self.chunk
        if chunk is None:
            return True
        try:
            sent = self.dst.send(chunk)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent == len(chunk):
            self.chunk = None
            return True
        self.chunk = chunk[sent:]
        return False
