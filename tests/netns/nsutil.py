"""Throw-away network namespaces for tests, and processes that run inside them.

A test never changes the host's interfaces: everything happens in a namespace created here
(``ip netns add``), and code under test runs in it as a subprocess (``ip netns exec``), so
the pytest process itself never switches namespace.  ``NetNamespace.close()`` stops every
process started in the namespace and deletes it; ``netns()`` guarantees that on any exit.

Typical end-to-end use (the fixtures in conftest.py wrap this)::

    with netns() as ns:
        ns.ip("link", "add", "ppx0", "type", "veth", "peer", "name", "ppx1")
        proxy = ns.popen([sys.executable, "-m", "portproxy", "run", "-f", "tcp://ppx0:80=..."])
        out = ns.run_python("import socket; ...").stdout
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
"""Put on PYTHONPATH of processes in the namespace, so they import this checkout."""

NAME_PREFIX = "ppxt-"

#: A UDP backend for ``popen_python``: answers each datagram on 127.0.0.1:9000 with
#: ``re:`` + the datagram, and prints "ready" once bound.
UDP_REPLY_BACKEND = """
import socket
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 9000))
print("ready", flush=True)
while True:
    data, source = sock.recvfrom(2048)
    sock.sendto(b"re:" + data, source)
"""
_NAME_RE = re.compile(rf"^{NAME_PREFIX}(\d+)-\d+$")
_counter = itertools.count()


class NetnsUnavailable(Exception):
    """Namespaces cannot be created here; the message says why (used as a skip reason)."""


def unavailable_reason() -> str | None:
    """Why this machine cannot run namespace tests, or None if it can (cheap checks only)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root to create network namespaces (run as root, as CI does)"
    if shutil.which("ip") is None:
        return "iproute2's 'ip' command is not installed"
    return None


def sweep_stale() -> None:
    """Delete namespaces left by earlier test runs whose process is gone (e.g. SIGKILLed)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    for line in listing.stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = _NAME_RE.match(name)
        if match and not _pid_alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_exists(name: str) -> bool:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return name in (line.split(" ", 1)[0] for line in listing.stdout.splitlines())


def python_env() -> dict[str, str]:
    """The environment for Python subprocesses: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class NsProcess:
    """A process running in a namespace, whose stdout lines can be awaited with a deadline.

    Both pipes are drained by threads, so a chatty process never blocks on a full pipe.
    """

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True, name="ns-stdout"),
            threading.Thread(target=self._read_stderr, daemon=True, name="ns-stderr"),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)

    def stderr_text(self) -> str:
        """What the process wrote to stderr so far."""
        return "".join(self._stderr)

    def expect_line(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        """The first further stdout line satisfying ``predicate``; fails at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                raise AssertionError(
                    f"no matching line within {timeout}s; saw {self.seen[-20:]!r}; "
                    f"stderr: {self.stderr_text()[-2000:]!r}"
                ) from None
            if line is None:
                self._lines.put(None)  # stay at EOF for later calls
                status = self.proc.wait()
                for reader in self._readers:
                    reader.join(5)
                raise AssertionError(
                    f"process exited ({status}) without a matching line; "
                    f"saw {self.seen[-20:]!r}; stderr: {self.stderr_text()[-2000:]!r}"
                )
            self.seen.append(line)
            if predicate(line):
                return line

    def expect_json(self, predicate: Callable[[Any], bool], timeout: float = 10.0) -> Any:
        """Like ``expect_line`` for processes printing one JSON document per line."""
        line = self.expect_line(lambda text: predicate(json.loads(text)), timeout)
        return json.loads(line)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL at the deadline; returns the exit status."""
        self.terminate(timeout)
        self.release(timeout)
        return self.proc.returncode

    def terminate(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it is still running at the deadline."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def release(self, timeout: float = 5.0) -> None:
        """Close the pipes once the readers saw EOF (children may hold them open a while)."""
        streams = (self.proc.stdout, self.proc.stderr)
        for reader, stream in zip(self._readers, streams, strict=True):
            reader.join(timeout)
            if stream is not None and not reader.is_alive():
                stream.close()


class NetNamespace:
    """A network namespace owned by one test."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[NsProcess] = []

    def ip(self, *args: str) -> str:
        """Run ``ip -n NAME ARGS`` (changes happen inside the namespace only); stdout."""
        done = subprocess.run(
            ["ip", "-n", self.name, *args], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(f"ip -n {self.name} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self, argv: Sequence[str], timeout: float = 30.0, check: bool = True, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace to completion, capturing text output."""
        kwargs.setdefault("env", python_env())
        done = subprocess.run(
            self.exec_argv(argv), capture_output=True, text=True, timeout=timeout, **kwargs
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{list(argv)!r} failed ({done.returncode}) in {self.name}:\n"
                f"stdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done

    def run_python(
        self, code: str, timeout: float = 30.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run Python code (this interpreter, this checkout) in the namespace."""
        return self.run([sys.executable, "-c", code], timeout=timeout, check=check)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> NsProcess:
        """Start a command in the namespace; it is stopped by ``close()`` at the latest."""
        kwargs.setdefault("env", python_env())
        proc = subprocess.Popen(
            self.exec_argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )
        handle = NsProcess(proc)
        self.processes.append(handle)
        return handle

    def popen_python(self, code: str, **kwargs: Any) -> NsProcess:
        return self.popen([sys.executable, "-c", code], **kwargs)

    def portproxy(self, *args: str) -> NsProcess:
        """Start ``portproxy ARGS`` (this checkout) in the namespace."""
        return self.popen([sys.executable, "-m", "portproxy", *args])

    def wait_tcp(self, host: str, port: int, listening: bool = True, timeout: float = 10.0) -> None:
        """Poll TCP connects from inside the namespace until ``host:port`` accepts them
        (or, with ``listening=False``, refuses them); AssertionError at the deadline."""
        code = f"""
import socket, sys, time
deadline = time.monotonic() + {timeout!r}
while time.monotonic() < deadline:
    try:
        socket.create_connection(({host!r}, {port!r}), timeout=1).close()
        accepted = True
    except OSError:
        accepted = False
    if accepted == {listening!r}:
        sys.exit(0)
    time.sleep(0.05)  # poll interval, bounded by the deadline
sys.exit(1)
"""
        done = self.run_python(code, timeout=timeout + 30, check=False)
        if done.returncode != 0:
            state = "accepting" if listening else "refusing"
            raise AssertionError(f"{host}:{port} not {state} connections within {timeout}s")

    def tcp_exchange(self, host: str, port: int, payload: bytes, timeout: float = 10.0) -> bytes:
        """Connect from inside the namespace, send ``payload``, half-close, return all
        bytes received until the peer closes."""
        code = f"""
import socket, sys
with socket.create_connection(({host!r}, {port!r}), timeout={timeout!r}) as c:
    c.sendall({payload!r})
    c.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := c.recv(65536):
        data += chunk
sys.stdout.write(data.hex())
"""
        return bytes.fromhex(self.run_python(code, timeout=timeout + 30).stdout)

    def add_veth(self, left: str, right: str) -> None:
        """A veth pair with both ends in this namespace, both up (so each has carrier)."""
        self.ip("link", "add", left, "type", "veth", "peer", "name", right)
        self.ip("link", "set", left, "up")
        self.ip("link", "set", right, "up")

    def supports_link_kind(self, kind: str) -> bool:
        """Whether the kernel can create links of ``kind`` (e.g. dummy needs its driver)."""
        probe = f"ppxprobe{next(_counter)}"[:15]
        try:
            self.ip("link", "add", probe, "type", kind)
        except RuntimeError:
            return False
        self.ip("link", "del", probe)
        return True

    def addresses(self, ifname: str) -> list[dict[str, Any]]:
        """The kernel's own view (``ip -j addr``): the address entries of ``ifname``."""
        data = json.loads(self.ip("-j", "addr", "show", "dev", ifname))
        return list(data[0]["addr_info"]) if data else []

    def pids(self) -> list[int]:
        done = subprocess.run(
            ["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in done.stdout.split()]

    def close(self) -> None:
        """Stop every process started here, then delete the namespace (and its links)."""
        for process in self.processes:
            with contextlib.suppress(Exception):
                process.terminate()
        # Anything still inside was started by our processes (the namespace is private to
        # this test): children that outlived their parent.  Killed by PID.
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for process in self.processes:
            with contextlib.suppress(Exception):
                process.release()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


@contextlib.contextmanager
def netns() -> Iterator[NetNamespace]:
    """A fresh namespace with lo up, removed again however the body exits."""
    reason = unavailable_reason()
    if reason is not None:
        raise NetnsUnavailable(reason)
    name = f"{NAME_PREFIX}{os.getpid()}-{next(_counter)}"
    created = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if created.returncode != 0:
        raise NetnsUnavailable(f"cannot create a network namespace: {created.stderr.strip()}")
    ns = NetNamespace(name)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        ns.close()
