"""The supervisor↔worker channel of ``--workers``: length-prefixed pickled messages.

Each message is a tuple whose first item names it: to a worker ``"settings"`` and
``"endpoints"``; from it ``"ready"`` or ``"failed"`` once, then ``"stats"`` each second and
``"applied"`` (None, or why it refused) or ``"draining"`` (it is stopping) for each
``"settings"`` after the first. Pickle
is safe here: both ends are this program, the worker started by its own supervisor over a
socketpair nobody else holds.
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
        self._sending = asyncio.Lock()

    async def send(self, *message: object) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        # A message goes out whole even if the sending task is cancelled meanwhile (a
        # worker stopping mid-report): half a frame would garble every later message.
        await asyncio.shield(self._send(_HEADER.pack(len(data)) + data))

    async def _send(self, frame: bytes) -> None:
        # One message at a time, in order: a send that fills the socket buffer finishes
        # later, and another task's bytes must not land in the middle of it.
        async with self._sending:
            await self.loop.sock_sendall(self.sock, frame)

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
