"""The event loop implementation: uvloop when installed (the ``fast`` extra), else asyncio's.

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
