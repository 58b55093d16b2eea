"""--workers: processes sharing the listeners, supervised, with summed metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess
from tests.net.harness import EchoServer, free_port, recv_all


def metric(admin: int, prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def two_workers(port: int, backend: EchoServer, drain_timeout: str) -> PortproxyProcess:
    return PortproxyProcess(["run", "--workers", "2", "-f",
                             f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}",
                             "--admin-address", "none", "--drain-timeout", drain_timeout])


def both_listening(proc: PortproxyProcess, port: int) -> bool:
    """Both workers logged that they listen on ``port``."""
    return sum(f"listening on tcp 127.0.0.1:{port}" in line for line in proc.lines) == 2


def two_workers_up(proc: PortproxyProcess, port: int) -> dict[int, int]:
    """Wait until both workers run and listen on ``port``; their pids by index."""
    pids = wait_for(lambda: len(proc.worker_pids()) == 2 and proc.worker_pids(),
                    what="both workers")
    wait_for(lambda: both_listening(proc, port), what="both workers to listen")
    return pids


def test_two_workers_share_the_port_restart_and_drain(backend: EchoServer) -> None:
    port, admin = free_port(), free_port()
    proc = PortproxyProcess(["run", "--workers", "2", "-f",
                             f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}",
                             "--admin-address", f"127.0.0.1:{admin}"])
    try:
        proc.wait_for_line("supervising 2 workers")
        pids = two_workers_up(proc, port)
        for i in range(40):
            assert exchange(port, b"req %d" % i) == b"req %d" % i
        wait_for(lambda: metric(admin, 'portproxy_connections_total{forward="tcp/127.0.0.1:'
                                f'{port}",result="ok"}}') == 40, what="summed counters")
        info = metric(admin, "portproxy_build_info")
        assert info == 1
        # One endpoint, known to the supervisor and to each worker: reported once.
        assert metric(admin, "portproxy_endpoints{") == 1

        os.kill(pids[0], signal.SIGKILL)  # a crashed worker is restarted
        proc.wait_for_line("worker 0 exited")
        wait_for(lambda: proc.worker_pids()[0] != pids[0], what="worker 0 to be restarted")
        wait_for(lambda: sum(f"listening on tcp 127.0.0.1:{port}" in line
                             for line in proc.lines) == 3, what="the new worker to listen")
        for i in range(20):
            assert exchange(port, b"after %d" % i) == b"after %d" % i
        # Counters of the dead worker are kept: the sum never goes backwards.
        wait_for(lambda: metric(admin, 'portproxy_connections_total{forward="tcp/127.0.0.1:'
                                f'{port}",result="ok"}}') == 60, what="60 counted")

        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        proc.signal(signal.SIGTERM)  # drains every worker
        proc.wait_for_line("draining 1 open connection")
        held.sendall(b"drain")
        assert held.recv(5, socket.MSG_WAITALL) == b"drain"
        held.close()
        assert proc.wait(20) == 0
        assert "all workers stopped" in proc.output
    finally:
        proc.stop()


def series_of(admin: int, name: str) -> list[str]:
    """The /metrics lines of forward ``name``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [line for line in text.splitlines() if f'forward="{name}"' in line]


def forwards(admin: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/forwards", timeout=5) as response:
        entries: list[dict[str, Any]] = json.load(response)
    return entries


def write_config(path: Path, admin: int, backend: EchoServer, *ports: int) -> None:
    """A config file: the admin endpoint, and one forward per port to ``backend``."""
    specs = ", ".join(f'"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}"' for port in ports)
    path.write_text(f'admin-address = "127.0.0.1:{admin}"\nforwards = [{specs}]\n')


def test_a_removed_forward_leaves_metrics_after_a_worker_restart(backend: EchoServer,
                                                                  tmp_path) -> None:
    kept, removed, admin = free_port(), free_port(), free_port()
    config = tmp_path / "c.toml"
    write_config(config, admin, backend, kept, removed)
    proc = PortproxyProcess(["run", "--workers", "2", "--config", str(config)])
    name = f"tcp/127.0.0.1:{removed}"
    try:
        pids = two_workers_up(proc, removed)
        for i in range(10):
            assert exchange(removed, b"x %d" % i) == b"x %d" % i
        counted = f'portproxy_connections_total{{forward="{name}",result="ok"}}'
        wait_for(lambda: metric(admin, counted) == 10, what="10 counted")
        for pid in pids.values():  # both: their counters now live on in the supervisor
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: all(proc.worker_pids().get(i) not in (None, pids[i]) for i in pids),
                 what="both workers to be restarted")
        wait_for(lambda: metric(admin, counted) == 10, what="the dead workers' shares kept")
        write_config(config, admin, backend, kept)
        proc.signal(signal.SIGHUP)
        wait_for(lambda: series_of(admin, name) == [], what=f"{name} to leave /metrics")
        assert series_of(admin, f"tcp/127.0.0.1:{kept}") != []
    finally:
        proc.stop()


def test_a_worker_that_cannot_bind_fails_the_start() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        proc = PortproxyProcess(["run", "--workers", "2", "-f",
                                 f"tcp://127.0.0.1:{port}=127.0.0.1:9", "--admin-address",
                                 "none"])
        try:
            assert proc.wait(20) == 3
            assert "already in use" in proc.output
        finally:
            proc.stop()
    finally:
        holder.close()


def test_sighup_reaches_every_worker(backend: EchoServer, tmp_path) -> None:
    first, second = free_port(), free_port()
    config = tmp_path / "c.toml"
    config.write_text(f'admin-address = "none"\nforwards = '
                      f'["tcp://127.0.0.1:{first}=127.0.0.1:{backend.port}"]\n')
    proc = PortproxyProcess(["run", "--workers", "2", "--config", str(config)])
    try:
        wait_for(lambda: both_listening(proc, first), what="both workers to listen")
        config.write_text(f'admin-address = "none"\nforwards = '
                          f'["tcp://127.0.0.1:{first}=127.0.0.1:{backend.port}", '
                          f'"tcp://127.0.0.1:{second}=127.0.0.1:{backend.port}"]\n')
        proc.signal(signal.SIGHUP)
        wait_for(lambda: both_listening(proc, second), what="both workers to add it")
        for i in range(10):  # the kernel spreads these over both workers
            assert exchange(second, b"new %d" % i) == b"new %d" % i
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def unread_bytes(pid: int) -> int:
    """Bytes waiting in the receive queues of ``pid``'s unix sockets (``ss -x``)."""
    import subprocess

    out = subprocess.run(["ss", "-x", "-p"], capture_output=True, text=True).stdout
    return sum(int(line.split()[2]) for line in out.splitlines()
               if f"pid={pid}," in line and line.split()[2].isdigit())


def test_a_sighup_sent_to_a_worker_names_the_supervisor(backend: EchoServer) -> None:
    port = free_port()
    proc = two_workers(port, backend, drain_timeout="5s")
    try:
        pids = two_workers_up(proc, port)
        os.kill(pids[0], signal.SIGHUP)
        expected = (f"worker {pids[0]} takes reloads from its supervisor: send SIGHUP to PID "
                    f"{proc.proc.pid}")
        wait_for(lambda: any(expected in line for line in proc.lines), what="the hint")
        assert not any("needs --config" in line for line in proc.lines)
        assert exchange(port, b"still serving") == b"still serving"
    finally:
        proc.stop()


def gone(pid: int) -> bool:
    """Exited: reaped, or a zombie (an orphan whose reaper, PID 1 in a container, may not
    reap it at all)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_workers_leave_when_the_supervisor_is_killed(backend: EchoServer) -> None:
    port = free_port()
    proc = two_workers(port, backend, drain_timeout="5s")
    try:
        pids = two_workers_up(proc, port)
        for i in range(20):
            assert exchange(port, b"%d" % i) == b"%d" % i
        # Stopped, the supervisor leaves the workers' reports unread; killed like that, its
        # sockets reset (ECONNRESET) instead of ending with EOF.
        os.kill(proc.proc.pid, signal.SIGSTOP)
        wait_for(lambda: unread_bytes(proc.proc.pid) > 0, what="reports to pile up")
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: all(gone(pid) for pid in pids.values()), timeout=30,
                 what="orphaned workers to drain and exit")
    finally:
        proc.stop()


def test_a_worker_draining_when_its_supervisor_dies_keeps_its_connections(
        backend: EchoServer) -> None:
    """SIGTERM, then the supervisor dies mid-drain: the worker's lost link must not count
    as a second signal (which resets every connection); the drain goes on."""
    port = free_port()
    proc = two_workers(port, backend, drain_timeout="60s")
    try:
        pids = two_workers_up(proc, port)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"before")
        assert client.recv(6, socket.MSG_WAITALL) == b"before"
        proc.signal(signal.SIGTERM)
        wait_for(lambda: sum("draining for up to" in line for line in proc.lines) == 2,
                 what="both workers to start draining")
        os.kill(proc.proc.pid, signal.SIGKILL)
        proc.wait(10)
        # The worker holding the connection is still draining; the other one leaves.
        wait_for(lambda: sum(not gone(pid) for pid in pids.values()) == 1,
                 what="the worker without connections to exit")
        alive = [pid for pid in pids.values() if not gone(pid)]
        proc.wait_for_line(f"worker {alive[0]}: the supervisor is gone")
        client.sendall(b"after")
        assert client.recv(5, socket.MSG_WAITALL) == b"after"  # reset before the fix
        client.shutdown(socket.SHUT_WR)
        assert recv_all(client) == b""
        client.close()
        wait_for(lambda: gone(alive[0]), timeout=30, what="the worker to finish and exit")
        assert "second signal" not in proc.output
    finally:
        proc.stop()


def test_a_worker_dying_mid_drain_does_not_bring_back_a_removed_forward(
        backend: EchoServer, tmp_path) -> None:
    kept, removed, admin = free_port(), free_port(), free_port()
    config = tmp_path / "c.toml"
    write_config(config, admin, backend, kept, removed)
    proc = PortproxyProcess(["run", "--workers", "2", "--config", str(config),
                             "--drain-timeout", "60s"])
    name = f"tcp/127.0.0.1:{removed}"
    held = None
    try:
        pids = two_workers_up(proc, removed)
        held = socket.create_connection(("127.0.0.1", removed), timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"  # a connection that keeps the removed forward draining
        wait_for(lambda: series_of(admin, name) != [], what="its series")
        write_config(config, admin, backend, kept)
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("configuration changed")
        # Listed while a worker drains it, with the connection (reported each second).
        wait_for(lambda: [(f["name"], f["active_connections"]) for f in forwards(admin)
                          if f["draining"]] == [(name, 1)], what="the draining entry")
        for pid in pids.values():  # whichever holds it dies draining, reporting it
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: all(proc.worker_pids().get(i) not in (None, pids[i]) for i in pids),
                 what="both workers to be restarted")
        wait_for(lambda: series_of(admin, name) == [], what=f"{name} to leave /metrics")
    finally:
        if held is not None:
            held.close()
        proc.stop()


def healthz(admin: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_stuck_worker_fails_healthz_until_it_reports_again(backend: EchoServer) -> None:
    # The kernel keeps handing a stuck worker its share of clients, which hang: liveness
    # must fail so that the pod is restarted, not only when the supervisor itself is stuck.
    port, admin = free_port(), free_port()
    proc = PortproxyProcess(["run", "--workers", "2", "-f",
                             f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}",
                             "--admin-address", f"127.0.0.1:{admin}"])
    try:
        pids = two_workers_up(proc, port)
        wait_for(lambda: healthz(admin) == (200, "ok\n"), what="healthy")
        os.kill(pids[1], signal.SIGSTOP)
        try:
            _, body = wait_for(lambda: (answer := healthz(admin))[0] == 503 and answer,
                                    timeout=30, what="/healthz to fail")
            assert body.startswith(f"worker 1 (pid {pids[1]}) unresponsive: last report ")
        finally:
            os.kill(pids[1], signal.SIGCONT)
        wait_for(lambda: healthz(admin) == (200, "ok\n"), what="healthy again")
    finally:
        proc.stop()


def test_each_worker_line_names_its_worker(backend: EchoServer) -> None:
    port = free_port()
    proc = two_workers(port, backend, drain_timeout="5s")
    try:
        two_workers_up(proc, port)
        listening = [line for line in proc.lines if f"listening on tcp 127.0.0.1:{port}" in line]
        assert sorted(line.rsplit(" ", 1)[1] for line in listening) == ["worker=0", "worker=1"]
    finally:
        proc.stop()


def test_a_reload_racing_a_worker_death_is_applied(backend: EchoServer, tmp_path) -> None:
    # Stopped, the supervisor sees the worker's end and the SIGHUP together on resuming:
    # the reload used to be offered to the dead worker, whose link was still set until the
    # process was reaped, and waited for its answer forever (with every later reload).
    first, second, third = free_port(), free_port(), free_port()
    config = tmp_path / "c.toml"

    def forwards(*ports: int) -> None:
        specs = ", ".join(f'"tcp://127.0.0.1:{p}=127.0.0.1:{backend.port}"' for p in ports)
        config.write_text(f'admin-address = "none"\nforwards = [{specs}]\n')

    forwards(first)
    proc = PortproxyProcess(["run", "--workers", "2", "--config", str(config)])
    try:
        pids = two_workers_up(proc, first)
        forwards(first, second)
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            os.kill(pids[0], signal.SIGKILL)
            wait_for(lambda: gone(pids[0]), what="the worker to die")
            proc.signal(signal.SIGHUP)
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        proc.wait_for_line("configuration changed")
        forwards(first, second, third)
        proc.signal(signal.SIGHUP)
        wait_for(lambda: both_listening(proc, third), timeout=30,
                 what="the next reload, in both workers (one restarted)")
        assert exchange(third, b"applied") == b"applied"
    finally:
        proc.stop()


