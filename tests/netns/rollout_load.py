"""Load for the rollout test: long-lived connections plus a stream of short ones.

Run inside the test's namespace: ``python rollout_load.py PORT MAX_SECONDS``. Prints
"started" once the long-lived connections are open. SIGUSR1 marks the moment the old
instance has closed its listener: the load then goes on until AFTER_MARK more short
connections have succeeded (so the hand-over is exercised whatever the timing), closes the
long-lived ones and prints one JSON line with what happened. Every exchange is checked byte
for byte; every loop is bounded by MAX_SECONDS.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

PORT, SECONDS = int(sys.argv[1]), float(sys.argv[2])
LONG_LIVED, SHORT_THREADS, AFTER_MARK = 10, 4, 200
results = {"short_ok": 0, "short_failed": 0, "long_ok": 0, "long_failed": 0,
           "short_after_mark": 0, "timed_out": False, "errors": []}
lock = threading.Lock()
marked, done = threading.Event(), threading.Event()


def record(key: str, error: str | None = None) -> None:
    with lock:
        results[key] += 1  # type: ignore[operator]
        if error and len(results["errors"]) < 10:  # type: ignore[arg-type]
            results["errors"].append(error)  # type: ignore[union-attr]


def exchange(sock: socket.socket, payload: bytes) -> bool:
    sock.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = sock.recv(65536)
        if not chunk:
            return False
        got += chunk
    return got == payload


def short_loop(deadline: float) -> None:
    while not done.is_set() and time.monotonic() < deadline:
        after_mark = marked.is_set()  # read before connecting: this one starts after it
        payload = os.urandom(2048)
        try:
            with socket.create_connection(("127.0.0.1", PORT), timeout=10) as conn:
                ok = exchange(conn, payload)
            record("short_ok" if ok else "short_failed", None if ok else "short mismatch")
        except OSError as exc:
            ok = False
            record("short_failed", f"short: {exc!r}")
        if ok and after_mark:
            record("short_after_mark")
            if results["short_after_mark"] >= AFTER_MARK:
                done.set()


def long_loop(conn: socket.socket, deadline: float) -> None:
    try:
        while not done.is_set() and time.monotonic() < deadline:
            payload = os.urandom(512)
            if not exchange(conn, payload):
                record("long_failed", "long mismatch")
                return
            time.sleep(0.02)  # pacing of the long-lived stream, not a wait for readiness
        conn.shutdown(socket.SHUT_WR)
        if conn.recv(1) != b"":
            record("long_failed", "no EOF")
            return
        record("long_ok")
    except OSError as exc:
        record("long_failed", f"long: {exc!r}")
    finally:
        conn.close()


def main() -> None:
    deadline = time.monotonic() + SECONDS
    signal.signal(signal.SIGUSR1, lambda *_: marked.set())
    conns = [socket.create_connection(("127.0.0.1", PORT), timeout=10)
             for _ in range(LONG_LIVED)]
    print("started", flush=True)
    threads = [threading.Thread(target=long_loop, args=(c, deadline)) for c in conns]
    threads += [threading.Thread(target=short_loop, args=(deadline,))
                for _ in range(SHORT_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 60)
    results["timed_out"] = not done.is_set()
    print(json.dumps(results), flush=True)


main()
