"""A worker process that cannot be started: one line and exit 3 at start; later, the
supervisor keeps serving with the others and retries.

The refusal is simulated by a small LD_PRELOAD library, built here with the system's C
compiler: its execv/execve fail with EAGAIN (as a fork/exec at the process limit does) for
the worker's command line while a marker file exists.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess
from tests.e2e.preload import build_preload
from tests.net.harness import EchoServer, free_port, recv_all

REFUSE_WORKER_EXEC = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static int refused(char *const argv[]) {
    const char *marker = getenv("REFUSE_WORKER_MARKER");
    if (!marker || access(marker, F_OK) != 0) return 0;
    for (int i = 0; argv[i]; i++)
        if (strcmp(argv[i], "portproxy.worker_process") == 0) return 1;
    return 0;
}
int execve(const char *path, char *const argv[], char *const envp[]) {
    static int (*real)(const char *, char *const[], char *const[]);
    if (!real) real = dlsym(RTLD_NEXT, "execve");
    if (refused(argv)) { errno = EAGAIN; return -1; }
    return real(path, argv, envp);
}
int execv(const char *path, char *const argv[]) {
    static int (*real)(const char *, char *const[]);
    if (!real) real = dlsym(RTLD_NEXT, "execv");
    if (refused(argv)) { errno = EAGAIN; return -1; }
    return real(path, argv);
}
"""


@pytest.fixture
def refuse_worker_exec(tmp_path: Path) -> Path:
    return build_preload(tmp_path, "refuse", REFUSE_WORKER_EXEC, "that refuses to start workers")


def environment(library: Path, marker: Path) -> dict[str, str]:
    return {"LD_PRELOAD": str(library), "REFUSE_WORKER_MARKER": str(marker)}


def test_a_worker_that_cannot_start_fails_the_start_in_one_line(
        refuse_worker_exec: Path, tmp_path: Path) -> None:
    marker = tmp_path / "refuse"
    marker.touch()
    proc = PortproxyProcess(["run", "--workers", "2", "-f",
                             f"tcp://127.0.0.1:{free_port()}=127.0.0.1:9",
                             "--admin-address", "none"],
                            env=environment(refuse_worker_exec, marker))
    try:
        assert proc.wait(30) == 3, proc.output
        said = [line for line in proc.lines if "cannot start worker" in line]
        assert len(said) == 1, proc.output
        assert "cannot start worker 0: Resource temporarily unavailable" in said[0]
        assert "Traceback" not in proc.output
    finally:
        proc.stop()


def test_a_worker_that_cannot_be_restarted_is_retried(
        refuse_worker_exec: Path, tmp_path: Path) -> None:
    backend = EchoServer()
    marker = tmp_path / "refuse"
    port = free_port()
    proc = PortproxyProcess(["run", "--workers", "2", "-f",
                             f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}",
                             "--admin-address", "none"],
                            env=environment(refuse_worker_exec, marker))
    try:
        pids = wait_for(lambda: len(proc.worker_pids()) == 2 and proc.worker_pids(),
                        what="both workers")
        marker.touch()  # from now on, a worker cannot be started
        os.kill(pids[0], signal.SIGKILL)
        proc.wait_for_line("cannot start worker 0: Resource temporarily unavailable; "
                           "check the memory and process limits; retrying in 1s")
        assert proc.proc.poll() is None  # the supervisor lives on
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"worker 1 serves")  # the other worker still listens
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"worker 1 serves"
        marker.unlink()
        wait_for(lambda: proc.worker_pids().get(0, pids[0]) != pids[0],
                 what="worker 0 to be started again")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
        backend.close()
