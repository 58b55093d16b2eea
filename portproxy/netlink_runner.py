"""Where ``netlink.py``'s pyroute2 coroutines run: a private stock event loop per call.

pyroute2's asyncio core keeps per-thread state and wants a stock selector loop, so every
pyroute2 call runs on a private event loop, in the calling thread when it has no loop of
its own, else in a worker thread (a netlink request to the kernel takes microseconds).
The caller's loop, maybe uvloop, never runs pyroute2 code. No pyroute2 import here: this
module only knows coroutine factories.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")

_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def run_private(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a pyroute2 coroutine on a private stock event loop in this thread."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(factory())


def netlink_executor() -> concurrent.futures.ThreadPoolExecutor:
    """Threads of our own: the default executor may be full of long blocking calls (API
    watches), and a new address must not wait for one of them to finish."""
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = concurrent.futures.ThreadPoolExecutor(
                max_workers=2, thread_name_prefix="portproxy-netlink"
            )
        return _EXECUTOR


def run_blocking(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a pyroute2 coroutine to completion from synchronous code.

    A thread that already runs an event loop cannot start another one, so then the work
    goes to a worker thread (and blocks the caller's loop for that netlink request).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run_private(factory)
    return netlink_executor().submit(run_private, factory).result()
