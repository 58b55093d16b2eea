"""--ready-file: present exactly while ready, gone as soon as draining starts."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess, run_cli
from tests.net.harness import EchoServer, free_port

MODES = pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])


@MODES
def test_the_file_appears_when_ready_and_goes_when_draining_starts(
        backend: EchoServer, tmp_path: Path, extra: list[str]) -> None:
    ready = tmp_path / "ready"
    port = free_port()
    proc = PortproxyProcess(["run", *extra, "--ready-file", str(ready), "--admin-address",
                             "none", "-f", f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}"])
    try:
        wait_for(ready.exists, what="the ready file")
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        proc.signal(signal.SIGTERM)
        wait_for(lambda: not ready.exists(), what="the ready file to go")
        held.sendall(b"draining")  # still served: the file went as the drain began
        assert held.recv(8, socket.MSG_WAITALL) == b"draining"
        held.close()
        assert proc.wait(20) == 0
        assert not ready.exists()
    finally:
        proc.stop()


@MODES
def test_no_file_while_a_target_is_unresolved(tmp_path: Path, extra: list[str]) -> None:
    ready = tmp_path / "ready"
    ready.write_text("ready\n")  # left by a crashed predecessor: an emptyDir outlives it
    spec = f"tcp://127.0.0.1:{free_port()}=unresolvable.invalid:80"
    proc = PortproxyProcess(["run", *extra, "--ready-file", str(ready), "--admin-address",
                             "none", "-f", spec])
    try:
        proc.wait_for_line("cannot resolve unresolvable.invalid")
        # Readiness is looked at from the start, every 0.5 s: by now it has been, and said no.
        assert not ready.exists() and "ready file" not in proc.output
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def test_an_unwritable_place_fails_the_start(tmp_path: Path) -> None:
    result = run_cli(["run", "--ready-file", str(tmp_path / "missing" / "ready"),
                      "--admin-address", "none",
                      "-f", f"tcp://127.0.0.1:{free_port()}=127.0.0.1:9"])
    assert result.returncode == 3, result.stderr
    assert "cannot write --ready-file" in result.stderr and "emptyDir" in result.stderr


def test_workers_a_dead_worker_withdraws_the_file_until_it_is_back(
        backend: EchoServer, tmp_path: Path) -> None:
    import os

    ready = tmp_path / "ready"
    port = free_port()
    proc = PortproxyProcess(["run", "--workers", "2", "--ready-file", str(ready),
                             "--admin-address", "none",
                             "-f", f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}"])
    try:
        pids = wait_for(lambda: len(proc.worker_pids()) == 2 and ready.exists()
                        and proc.worker_pids(), what="two workers and the ready file")
        os.kill(pids[0], signal.SIGKILL)  # its listener is gone: not every one is bound
        proc.wait_for_line("worker 0 exited")
        wait_for(lambda: not ready.exists(), what="the file to go")
        wait_for(lambda: proc.worker_pids().get(0) not in (None, pids[0]) and ready.exists(),
                 what="the file back with the restarted worker")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
