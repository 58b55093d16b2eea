"""The event loop implementation: uvloop when installed (the ``fast`` extra), else asyncio's,
and the one waiting helper the engines share.

The engines only use ``add_reader``/``add_writer``, timers and sockets, which both loops
provide; uvloop makes each of those cheaper.
"""

from __future__ import annotations

import asyncio


def install_fast_loop() -> str:
    """Use uvloop for the next ``asyncio.run`` if it is installed; return the loop's name."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def wait_at_most(event: asyncio.Event, timeout: float | None) -> bool:
    """Wait until ``event`` is set, for ``timeout`` seconds at most (None: no limit); True
    if it was set."""
    try:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # races with the event (the waiting task then never stops).
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
