#!/usr/bin/env python3
"""`make demo`: a local backend, portproxy in front of it, traffic through it, a summary.

Everything stays on 127.0.0.1 and stops by itself.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def echo_backend() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def handle(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"portproxy exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit("portproxy did not become ready in time")


def transfer(port: int, payload: bytes) -> bytes:
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        def read() -> None:
            while chunk := conn.recv(1 << 20):
                received.extend(chunk)
        reader = threading.Thread(target=read)
        reader.start()
        conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)  # half-close: the backend still answers
        reader.join()
    return bytes(received)


def main() -> int:
    backend = echo_backend()
    backend_port = backend.getsockname()[1]
    listen_port, admin_port = free_port(), free_port()
    spec = f"tcp://127.0.0.1:{listen_port}=127.0.0.1:{backend_port}"
    print(f"backend echo server on 127.0.0.1:{backend_port}")
    print(f"starting: portproxy run -f {spec} --admin-address 127.0.0.1:{admin_port}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "portproxy", "run", "-f", spec,
         "--admin-address", f"127.0.0.1:{admin_port}", "--log-level", "warning"])
    try:
        wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc)
        payload = os.urandom(32 * 1024 * 1024)
        started = time.monotonic()
        echoed = transfer(listen_port, payload)
        elapsed = time.monotonic() - started
        same = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        print(f"sent {len(payload):,} bytes, got {len(echoed):,} back in {elapsed:.2f}s: "
              f"{'byte-exact' if same else 'MISMATCH'}")
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics") as response:
            metrics = response.read().decode()
        for line in metrics.splitlines():
            if line.startswith(("portproxy_build_info", "portproxy_bytes_total",
                                "portproxy_connections_total")):
                print("  " + line)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        print(f"portproxy stopped on SIGTERM with exit code {code}")
        return 0 if same and code == 0 else 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        backend.close()


if __name__ == "__main__":
    sys.exit(main())
