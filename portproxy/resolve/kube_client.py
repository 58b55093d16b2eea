"""Helpers around the API client that need no ``kubernetes`` import: thread hand-off, errors.

Kept apart from ``kubernetes.py`` (the only importer of the client) so that module stays about
the client itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

from portproxy.errors import ResolveError, SetupError
from portproxy.resolve.kube_informer import ApiStatusError, Query, TransientError, problem_line

T = TypeVar("T")


def _settle(future: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


async def call_in_thread(function: Callable[[], T], name: str = "kube-call") -> T:
    """Run a blocking client call in a daemon thread and await its result.

    Not ``run_in_executor``: the default executor is joined at interpreter exit, and a
    daemon thread cannot hold shutdown up. The calls themselves are bounded by the
    client's request timeout. A ``StopIteration`` is turned into a ``RuntimeError`` before
    it reaches the Future (asyncio cannot carry it across).
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


def check_error(exc: ApiStatusError | TransientError, verb: str, query: Query,
                host: str) -> Exception:
    """The error ``portproxy check`` raises for an API failure (RBAC/auth → SetupError)."""
    if isinstance(exc, ApiStatusError) and exc.code in (401, 403):
        return SetupError(problem_line(exc, verb, query, retrying=False))
    if isinstance(exc, TransientError):
        return ResolveError(f"cannot reach the Kubernetes API at {host}: {exc}")
    return ResolveError(problem_line(exc, verb, query, retrying=False))
