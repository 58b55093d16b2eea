"""``--ready-file PATH``: a file that exists exactly while this instance is ready.

On the host network the two pods of a rolling update share the admin port (SO_REUSEPORT),
so the kubelet's HTTP readiness probe of the new pod may be answered by the old one. A file
in the pod's own filesystem cannot be: an exec probe ``test -e PATH`` asks this instance
and no other. The file appears once /readyz would say ready (every forward bound and
resolved, every ConfigMap read), goes when that stops being true, and goes for good when
the instance starts to stop. Like /readyz it says nothing of a hung event loop: that is the
liveness probe's job (/healthz).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from portproxy.errors import SetupError
from portproxy.status import StatusSource, readiness

log = logging.getLogger("portproxy")

#: How often readiness is looked at: the kubelet probes every few seconds at best.
INTERVAL = 0.5


class ReadyFile:
    def __init__(self, path: str, source: StatusSource, interval: float = INTERVAL) -> None:
        self.path = path
        self.source = source
        self.interval = interval
        self.present = False
        self._withdrawn = False
        self._failing = False

    @classmethod
    def prepared(cls, path: str | None, source: StatusSource) -> ReadyFile | None:
        """The ready file of ``path`` (None without one), prepared: see ``prepare``."""
        if path is None:
            return None
        ready_file = cls(path, source)
        ready_file.prepare()
        return ready_file

    def prepare(self) -> None:
        """At start, first thing: remove a file a killed predecessor left (an emptyDir
        outlives a container restart), and fail the start (exit 3) where no file can be
        written, rather than leave the pod unready for good."""
        if os.path.isdir(self.path):
            raise SetupError(f"--ready-file {self.path} is a directory: give a file path "
                             "inside it (e.g. /run/portproxy/ready)")
        try:
            self._remove()
            self._write(f"{self.path}.probe")
            self._remove(f"{self.path}.probe")
        except OSError as exc:
            raise SetupError(f"cannot write --ready-file {self.path}: "
                             f"{exc.strerror or exc}; mount a writable directory there "
                             "(an emptyDir in Kubernetes)") from None

    async def run(self) -> None:
        while not self._withdrawn:
            self.update(not readiness(self.source))
            await asyncio.sleep(self.interval)

    def update(self, ready: bool) -> None:
        if self._withdrawn or ready == self.present:
            return
        try:
            if ready:
                self._write(self.path)
            else:
                self._remove()
        except OSError as exc:  # the probe then reports the truth late: say so, once
            if not self._failing:
                log.error("cannot update --ready-file %s: %s", self.path, exc.strerror or exc)
            self._failing = True
            return
        if self._failing:
            log.info("--ready-file %s can be updated again", self.path)
        self._failing = False
        self.present = ready
        log.info("ready file %s %s", self.path, "written" if ready else "removed")

    def withdraw(self) -> None:
        """Stopping: not ready any more, whatever happens next."""
        self._withdrawn = True
        if self.present:
            with contextlib.suppress(OSError):
                self._remove()
            self.present = False
            log.info("ready file %s removed (stopping)", self.path)

    @staticmethod
    def _write(path: str) -> None:
        # Written aside and renamed: a probe never sees a half-written file.
        temporary = f"{path}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as stream:
                stream.write("ready\n")
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _remove(self, path: str | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path or self.path)
