"""The gate every forwarder passes before it is measured: 1 MiB byte-exact with a half-close."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time

PAYLOAD_SIZE = 1 << 20
TIMEOUT = 15.0


def half_close_check(host: str, port: int) -> str | None:
    """Send 1 MiB, shut the write side, read the echo to EOF; None if it came back intact.

    The sender runs in a thread so the echo is read while it is still being sent: otherwise
    the socket buffers of a forwarder with small buffers could deadlock the exchange.
    """
    payload = os.urandom(PAYLOAD_SIZE)
    sent_error: list[str] = []
    try:
        sock = socket.create_connection((host, port), timeout=TIMEOUT)
    except OSError as exc:
        return f"connect failed: {exc}"

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            sent_error.append(f"send failed: {exc}")

    sender = threading.Thread(target=send, name="half-close-sender", daemon=True)
    received = bytearray()
    deadline = time.monotonic() + TIMEOUT
    with sock:
        sender.start()
        try:
            while time.monotonic() < deadline and len(received) <= PAYLOAD_SIZE:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            else:
                return f"no EOF after {len(received)} bytes"
        except OSError as exc:
            return f"receive failed after {len(received)} bytes: {exc}"
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sender.join(TIMEOUT)
    if sent_error:
        return sent_error[0]
    if hashlib.sha256(received).digest() != hashlib.sha256(payload).digest():
        return f"echo differs: {len(received)} bytes back of {PAYLOAD_SIZE}"
    return None
