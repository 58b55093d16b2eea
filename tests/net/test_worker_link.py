"""The --workers link: messages larger than the socket buffer, sent by several tasks at once,
arrive whole and in order."""

from __future__ import annotations

import asyncio
import socket

import pytest

from portproxy.worker_link import Link
from tests.net.udp_harness import loop_factory


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_concurrent_large_messages_arrive_whole_and_in_order(loop_name: str) -> None:
    factory = loop_factory(loop_name)
    if factory is None:
        pytest.skip("uvloop is not installed (the 'fast' extra)")
    # Each message is several times the socketpair's buffer: every send is partial and
    # finishes only as the reader drains it, while the other senders are already waiting.
    messages = [("endpoints", f"forward-{i}", bytes([i]) * 3_000_000) for i in range(4)]

    async def main() -> list[tuple[object, ...]]:
        left, right = socket.socketpair()
        sender, receiver = Link(left), Link(right)
        try:
            sends = [asyncio.create_task(sender.send(*message)) for message in messages]
            received = [await asyncio.wait_for(receiver.receive(), 30) for _ in messages]
            await asyncio.wait_for(asyncio.gather(*sends), 30)
            return received
        finally:
            left.close()
            right.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) == messages
