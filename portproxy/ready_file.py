"""``--ready-file PATH``: a file that exists exactly while this instance is ready.

On the host network the two pods of a rolling update share the admin port (SO_REUSEPORT),
so the kubelet's HTTP readiness probe of the new pod may be answered by the old one. A file
in the pod's own filesystem cannot be: an exec probe ``test -e PATH`` asks this instance
and no other. The file appears once every forward is bound and resolved (what /readyz
says), goes when that stops being true, and goes for good when the instance starts to stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from portproxy.errors import SetupError
from portproxy.status import StatusSource, is_ready

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

    def check_writable(self) -> None:
        """At start: a directory that is missing or read-only fails the start (exit 3)
        rather than leaving the pod unready for good. It also clears a file a crashed
        predecessor left (an emptyDir outlives a container restart)."""
        try:
            self._write()
        except OSError as exc:
            raise SetupError(f"cannot write --ready-file {self.path}: "
                             f"{exc.strerror or exc}; mount a writable directory there "
                             "(an emptyDir in Kubernetes)") from None
        self._remove()

    async def run(self) -> None:
        while not self._withdrawn:
            self.update(is_ready(self.source.forward_statuses()))
            await asyncio.sleep(self.interval)

    def update(self, ready: bool) -> None:
        if self._withdrawn or ready == self.present:
            return
        try:
            if ready:
                self._write()
            else:
                self._remove()
        except OSError as exc:  # the probe then reports the truth late; say why
            log.error("cannot update --ready-file %s: %s", self.path, exc.strerror or exc)
            return
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

    def _write(self) -> None:
        # Written aside and renamed: a probe never sees a half-written file.
        temporary = f"{self.path}.tmp"
        with open(temporary, "w", encoding="utf-8") as stream:
            stream.write("ready\n")
        os.replace(temporary, self.path)

    def _remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
