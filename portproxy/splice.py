"""Zero-copy pump: socket → pipe → socket with ``splice(2)``, never through user space.

Pipes are pooled and held by a direction only while bytes are in flight, so an idle
connection costs no pipe (two file descriptors and the pipe's pages each). The pipe's
capacity bounds what a direction holds (backpressure), and is raised with ``F_SETPIPE_SZ``
so a bulk transfer moves more per system call.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

from portproxy.metrics import Counter
from portproxy.pump import COPY_CHUNK, CopyDirection, Direction
from portproxy.sockets import RESOURCE_ERRNOS

if TYPE_CHECKING:
    from portproxy.relay import Relay

log = logging.getLogger("portproxy.pump")

#: Pipe capacity, by measurement: iperf3 2 GiB through portproxy on loopback, 3 runs each,
#: medians 9.0 Gbit/s (64 KiB, the kernel default), 12.2 (256 KiB), 12.4 (1 MiB). 256 KiB
#: gets nearly all of the gain at a quarter of the memory per in-flight pipe.
PIPE_SIZE = 256 * 1024
#: A read this large means a bulk transfer: from then on ``AutoDirection`` splices.
SPLICE_AFTER = 64 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
SIOCATMARK = 0x8905  # linux/sockios.h
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class Pipe:
    __slots__ = ("r", "size", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.size = fcntl.fcntl(self.w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            # Over the per-user pipe quota the kernel refuses; the default size still works.
            self.size = 65536

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class PipePool:
    """Empty pipes ready for reuse; a pipe that may hold data is closed instead."""

    def __init__(self, keep: int = 64) -> None:
        self._free: list[Pipe] = []
        self._keep = keep

    def acquire(self) -> Pipe:
        return self._free.pop() if self._free else Pipe()

    def release(self, pipe: Pipe) -> None:
        if len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            pipe.close()

    def close(self) -> None:
        while self._free:
            self._free.pop().close()


POOL = PipePool()


def at_urgent_mark(fd: int) -> bool:
    """Whether the next byte of TCP socket ``fd`` is urgent data (``SIOCATMARK``).

    Splice stops short of the urgent mark: it returns EAGAIN there while epoll keeps
    reporting the socket readable (a busy loop), and 0 once a FIN follows, which reads as
    the end of the stream and would cut off everything behind the mark. A ``recv`` reads
    on, in line (``tune_stream`` sets SO_OOBINLINE). Asked only when splice moved nothing:
    one ``ioctl`` on a path that is already rare."""
    try:
        answer = fcntl.ioctl(fd, SIOCATMARK, b"\0\0\0\0")
    except OSError:
        return False
    mark: int = struct.unpack("i", answer)[0]
    return mark != 0


class SpliceDirection(Direction):
    __slots__ = ("pending", "pipe")

    def __init__(
        self, relay: Relay, src: socket.socket, dst: socket.socket, counter: Counter,
    ) -> None:
        super().__init__(relay, src, dst, counter)
        self.pipe: Pipe | None = None
        self.pending = 0
        self.capacity = PIPE_SIZE

    def _splice_fill(self) -> int:
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = POOL.acquire()
            except OSError as exc:
                if exc.errno not in RESOURCE_ERRNOS:  # the process's limits, not the socket's
                    raise
                self._copy_instead()
                return -1
            self.pipe = pipe
            self.capacity = pipe.size
        try:
            n = os.splice(self.src_fd, pipe.w, pipe.size, flags=_FLAGS)
        except (BlockingIOError, InterruptedError):
            self._give_back()
            if at_urgent_mark(self.src_fd):
                self._copy_instead()
            return -1
        if n == 0:
            self._give_back()
            if at_urgent_mark(self.src_fd):  # not the end: the FIN is behind the mark
                self._copy_instead()
                return -1
        self.pending = n
        return n

    def _splice_flush(self) -> bool:
        pipe = self.pipe
        while self.pending:
            assert pipe is not None
            try:
                self.pending -= os.splice(pipe.r, self.dst_fd, self.pending, flags=_FLAGS)
            except (BlockingIOError, InterruptedError):
                return False
        self._give_back()
        return True

    _fill = _splice_fill
    _flush = _splice_flush

    def _copy_instead(self) -> None:
        """Copy through user space, rather than reset a working connection, when no pipe is
        to be had (out of descriptors or memory: a copy needs none), or when ``src`` is at
        TCP's urgent mark, which splice never reads past (see ``at_urgent_mark``). Nothing
        is in flight (a pipe is only taken when none is held), and the copy reader,
        registered in place of this one, is told again about the bytes waiting
        (level-triggered). A later bulk read tries splicing again."""
        self.__class__ = AutoDirection
        self.capacity = COPY_CHUNK
        self.poller.add_reader(self.src_fd, self.on_readable)

    def _give_back(self) -> None:
        if self.pipe is not None and not self.pending:
            POOL.release(self.pipe)
            self.pipe = None

    def release(self) -> None:
        if self.pipe is not None:
            if self.pending:
                self.pipe.close()  # holds bytes that will never be delivered
                self.pending = 0
                self.pipe = None
            else:
                self._give_back()


class AutoDirection(CopyDirection, SpliceDirection):
    """Copies small transfers and splices bulk ones (the idea of HAProxy's splice-auto).

    For a message of a few hundred bytes, splice(2) does not save a copy worth having: the
    kernel still walks the same socket buffers, and each message then costs a pipe taken
    from the pool and given back. So a direction starts as a ``CopyDirection`` and, after
    one read of ``SPLICE_AFTER`` bytes or more, which only a bulk transfer produces (the
    sender was ahead of us by that much), becomes a ``SpliceDirection`` for good.
    Becoming one is a change of class, not a flag tested on every read: the two share
    their slots, and the copy path stays the one-call path it is for small messages.
    """

    __slots__ = ()

    bulk_read = SPLICE_AFTER

    def _on_bulk(self) -> None:
        # Only called once the chunk has gone out whole: nothing is pending in either mode.
        self.__class__ = SpliceDirection  # type: ignore[assignment]
        self.capacity = PIPE_SIZE
        # The poller holds the copy mode's reader; level-triggered, so bytes still waiting
        # are reported again, to the splice reader.
        self.poller.add_reader(self.src_fd, self.on_readable)


def splice_available() -> tuple[bool, str]:
    """Probe once whether splice works here (Linux with os.splice, not blocked by seccomp)."""
    if not hasattr(os, "splice"):
        return False, "os.splice is not available on this platform"
    a, b = socket.socketpair()
    pipe = None
    try:
        pipe = Pipe()
        a.send(b"x")
        b.setblocking(False)
        moved = os.splice(b.fileno(), pipe.w, 1, flags=_FLAGS)
        if moved != 1:
            return False, f"splice moved {moved} bytes in the probe"
        return True, "splice"
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return False, f"splice probe failed: {reason}"
    finally:
        a.close()
        b.close()
        if pipe is not None:
            pipe.close()
