"""Running ``portproxy`` as a real subprocess, with its log lines collected."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

from tests.conftest import wait_for


class PortproxyProcess:
    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "portproxy", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env, text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for_line(self, text: str, timeout: float = 15.0, nth: int = 1) -> str:
        """The ``nth`` line containing ``text`` since the start, once logged."""
        def find() -> str | None:
            matches = [line for line in self.lines if text in line]
            if len(matches) >= nth:
                return matches[nth - 1]
            if self.proc.poll() is not None:
                raise AssertionError(f"portproxy exited {self.proc.returncode}:\n{self.output}")
            return None
        found = wait_for(find, timeout, what=f"log line {text!r}")
        return found

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def worker_pids(self) -> dict[int, int]:
        """``--workers``: each worker's pid by index, from the supervisor's log."""
        pids: dict[int, int] = {}
        for line in self.lines:
            if "running (pid" in line and "worker " in line:
                index = int(line.split("worker ", 1)[1].split()[0])
                pids[index] = int(line.split("(pid ", 1)[1].split(")")[0])
        return pids

    def stop(self) -> None:
        """Kill portproxy, and any worker it left behind: workers run in sessions of their
        own, and one the supervisor did not stop (a failed test) would outlive it. Each is
        killed by pid, and only while that pid is still a portproxy worker."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.worker_pids().values():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                    if b"portproxy.worker_process" not in cmdline.read():
                        continue  # gone, and the number reused
                os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def run_cli(args: Sequence[str], timeout: float = 30.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "portproxy", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
