"""Starting and stopping the processes under test, and reading their CPU and memory from /proc."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies.

    Nothing we start may outlive the harness, even when the harness itself is SIGKILLed
    (a test timeout): the setting survives exec, so it is set between fork and exec.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


class Proc:
    """One started program, in its own session so its whole process group can be stopped.

    Output goes to a log file in ``log_dir`` so a failure can quote its tail.
    """

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path, *,
                 cpu: int | None = None, cwd: Path | None = None) -> None:
        self.name = name
        # taskset execs the program, so the PID we hold is the program's own.
        self.argv = (["taskset", "-c", str(cpu)] if cpu is not None else []) + list(argv)
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=cwd, start_new_session=True, preexec_fn=die_with_parent)
        self.pid = self.popen.pid

    def exited(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def terminate(self) -> None:
        """SIGTERM the group without waiting."""
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group, wait up to ``grace``, then SIGKILL whatever of it is left."""
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(timeout=grace)
        # Forked children (socat's) may outlive their parent: sweep the group we created.
        self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def process_tree(roots: Iterable[int]) -> list[int]:
    """The roots and all their live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    todo = list(roots)
    while todo and len(found) < 1_000_000:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(roots: Iterable[int]) -> float:
    """utime+stime of every live process in the trees, plus what they reaped from dead children.

    A child that exits between two samples moves from its own utime+stime into its parent's
    cutime+cstime, so the sum stays continuous (socat forks a child per connection).
    """
    ticks = 0
    for pid in process_tree(roots):
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += sum(int(f) for f in fields[11:15])
    return ticks / CLK_TCK


def rss_kib(roots: Iterable[int]) -> int:
    """Sum of VmRSS over every live process in the trees."""
    total = 0
    for pid in process_tree(roots):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def wait_tcp(host: str, port: int, deadline: float, alive: Sequence[Proc] = ()) -> str | None:
    """Poll until ``port`` accepts; an error text if the deadline passes or a process dies."""
    while time.monotonic() < deadline:
        for proc in alive:
            code = proc.exited()
            if code is not None:
                return f"{proc.name} exited with code {code}: {proc.log_tail()}"
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return None
        except OSError:
            time.sleep(0.02)
    return f"nothing accepted on {host}:{port} before the deadline"


def udp_echoes(host: str, port: int, deadline: float, alive: Sequence[Proc] = ()) -> bool:
    """Send probes until one comes back, the deadline passes, or one of ``alive`` exits."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((host, port))
        while time.monotonic() < deadline:
            if any(proc.exited() is not None for proc in alive):
                return False
            with contextlib.suppress(ConnectionRefusedError):
                sock.send(b"probe")
            sock.settimeout(0.2)
            try:
                if sock.recv(64) == b"probe":
                    return True
            except (TimeoutError, ConnectionRefusedError):
                continue
    return False


def raise_fd_limit(wanted: int) -> None:
    """Raise RLIMIT_NOFILE (inherited by everything started later) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
