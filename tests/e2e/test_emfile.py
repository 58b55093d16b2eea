"""Out of file descriptors: accept backs off and counts, the listener survives, and a live
connection keeps working."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import urllib.request

from tests.conftest import wait_for
from tests.net.harness import EchoServer, free_port, recv_all, stop_process

FD_LIMIT = 64


def limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def start_limited(port: int, backend: EchoServer, admin: str
                  ) -> tuple[subprocess.Popen[str], list[str]]:
    """portproxy on ``port`` → ``backend`` with FD_LIMIT descriptors, listening; its log
    lines are collected as they come."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "portproxy", "run", "-f",
         f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}", "--admin-address", admin],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=limit_fds)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True).start()
    try:
        wait_for(lambda: any("listening on tcp" in line for line in lines),
                 what="portproxy to start")
    except BaseException:
        proc.kill()
        proc.wait(20)
        raise
    return proc, lines


def test_emfile_backs_off_and_recovers() -> None:
    backend = EchoServer()
    port, admin = free_port(), free_port()
    proc, lines = start_limited(port, backend, f"127.0.0.1:{admin}")
    clients: list[socket.socket] = []
    try:
        for _ in range(FD_LIMIT):  # more connections than the proxy has descriptors for
            try:
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            except ConnectionResetError:
                pass  # a client the proxy could not serve is reset: expected here
        # Depending on the loop, accept() or the backend socket() hits the limit first.
        wait_for(lambda: any("failed (Too many open files); not accepting for" in line
                             for line in lines), what="the EMFILE back-off")
        assert proc.poll() is None  # alive
        for client in clients:
            client.close()
        clients.clear()

        def works() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                    client.sendall(b"again")
                    client.shutdown(socket.SHUT_WR)
                    return recv_all(client) == b"again"
            except OSError:
                return False
        wait_for(works, timeout=20, what="the listener to serve again")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as answer:
            metrics = answer.read().decode()
        errors = [line for line in metrics.splitlines()
                  if line.startswith("portproxy_accept_errors_total{")]
        assert errors and float(errors[0].rsplit(" ", 1)[1]) >= 1
    finally:
        for client in clients:
            client.close()
        stop_process(proc)
        backend.close()


def test_out_of_descriptors_a_transfer_turning_bulk_keeps_copying() -> None:
    """Splicing needs a pipe (two descriptors); without one, copying needs none. A live
    connection whose transfer turns bulk when no descriptor is left must keep going."""
    payload = os.urandom(1 << 20)
    go_bulk = threading.Event()
    first = threading.Lock()

    def backend_side(conn: socket.socket) -> None:
        if not first.acquire(blocking=False):
            recv_all(conn)  # the idle connections that use up the descriptors
            return
        conn.sendall(b"hello")  # small: the copy mover handles it
        go_bulk.wait(30)
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        recv_all(conn)

    backend = EchoServer(handler=backend_side)
    port = free_port()
    proc, lines = start_limited(port, backend, "none")
    idle: list[socket.socket] = []
    try:
        live = socket.create_connection(("127.0.0.1", port), timeout=20)
        assert live.recv(5, socket.MSG_WAITALL) == b"hello"

        def out_of_descriptors() -> bool:
            return any("failed (Too many open files); not accepting for" in line
                       for line in lines)
        for _ in range(2 * FD_LIMIT):
            if out_of_descriptors():
                break
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            except ConnectionResetError:
                pass  # a client the proxy could not serve is reset: expected here
        wait_for(out_of_descriptors, what="the proxy to run out of descriptors")

        go_bulk.set()
        received = recv_all(live)  # reset here if the switch to splice gave up
        assert received == payload
        live.close()
        assert proc.poll() is None
    finally:
        go_bulk.set()
        for conn in idle:
            conn.close()
        stop_process(proc)
        backend.close()


def test_out_of_descriptors_for_the_backend_socket_clients_wait_rather_than_reset() -> None:
    """The accept takes the last descriptor and the backend socket finds none: that client
    and those queued behind it wait for descriptors (the back-off), none is reset."""
    backend = EchoServer()
    port = free_port()
    proc, lines = start_limited(port, backend, "none")
    held: list[socket.socket] = []
    burst: list[socket.socket] = []
    try:
        for i in range(5):
            client = socket.create_connection(("127.0.0.1", port), timeout=10)
            client.sendall(b"%d" % i)
            assert client.recv(1) == b"%d" % i
            held.append(client)
        in_use = len(os.listdir(f"/proc/{proc.pid}/fd"))
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (in_use + 1, FD_LIMIT))
        burst = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
        wait_for(lambda: any("connect failed (Too many open files); not accepting for" in line
                             for line in lines), what="the back-off")
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))
        for i, client in enumerate(burst):
            client.sendall(b"burst %d" % i)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"burst %d" % i
    finally:
        for client in [*held, *burst]:
            client.close()
        stop_process(proc)
        backend.close()
