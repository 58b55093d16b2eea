"""Blocking calls awaited from the event loop, each in a daemon thread of its own.

Not ``run_in_executor``: ``asyncio.run`` joins the default executor's threads at exit, so
one blocking call (a DNS lookup against a nameserver that never answers, an API request)
would hold the process up long after its drain. A daemon thread cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


async def call_in_thread(function: Callable[[], T], name: str = "blocking-call") -> T:
    """Run a blocking call in a daemon thread and await its result.

    The caller bounds the call itself (the API client's request timeout, the resolver's
    own). A ``StopIteration`` is turned into a ``RuntimeError`` before it reaches the
    Future (asyncio cannot carry it across).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = function()
        except StopIteration as exc:
            error = RuntimeError(f"unexpected StopIteration from a client call: {exc!r}")
        except BaseException as exc:  # handed to the awaiting task, which decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, future, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
