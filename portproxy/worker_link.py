"""The supervisor↔worker channel of ``--workers``: length-prefixed pickled messages.

Each message is a tuple whose first item names it (``"settings"``, ``"endpoints"``,
``"ready"``, ``"stats"``, ``"failed"``). Pickle is safe here: both ends are this program,
the worker started by its own supervisor over a socketpair nobody else holds.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from typing import Any

_HEADER = struct.Struct("!I")


class Link:
    """Length-prefixed pickled messages over a non-blocking stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def send(self, *message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        await self.loop.sock_sendall(self.sock, _HEADER.pack(len(data)) + data)

    async def _exactly(self, size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = await self.loop.sock_recv(self.sock, size - len(chunks))
            if not chunk:
                raise EOFError
            chunks += chunk
        return bytes(chunks)

    async def receive(self) -> tuple[Any, ...]:
        (size,) = _HEADER.unpack(await self._exactly(_HEADER.size))
        message: tuple[Any, ...] = pickle.loads(await self._exactly(size))
        return message
