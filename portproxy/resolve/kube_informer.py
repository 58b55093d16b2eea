"""List-then-watch of one Kubernetes query in a thread, robust to everything the API does.

Client-agnostic: the HTTP calls go through a ``Transport`` (``kubernetes.py`` implements it
with the official client) that raises only the exceptions below, so this loop never sees a
third-party exception type. The loop (kopf's ``continuous_watch`` shape):

1. LIST (gives every object and a resourceVersion) → publish the full set (``synced``).
2. WATCH from that resourceVersion; ADDED/MODIFIED/DELETED update the set and publish;
   BOOKMARK only advances the resourceVersion (the object is never interpreted).
3. The server ends the stream at ``timeoutSeconds`` → watch again from the last
   resourceVersion, no relist, no delay.
4. 410 Gone (ERROR event or HTTP status) → relist and rebuild (history was compacted or the
   API restarted). A dropped or stalled stream, a refused connection, a 5xx → retry with
   capped exponential backoff and jitter. 401/403 → one clear line, then keep retrying
   (RBAC granted later recovers without a restart). As in client-go's reflector, a stream
   that breaks part-way keeps its progress: the retry resumes from the last event or
   BOOKMARK it delivered (never replaying what was already applied), and a stream that
   delivered anything resets the backoff.
5. Through any failure the last published set stays as it is, so endpoints keep serving.

The thread is a daemon and every blocking call is bounded (the transport's timeouts), so it
can neither hang nor hold up interpreter exit; ``stop()`` also aborts an open stream.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from portproxy.resolve.kube_state import Problem

log = logging.getLogger("portproxy.kube")

Obj = dict[str, Any]


class ApiStatusError(Exception):
    """The API answered with an error status (HTTP or a watch ERROR event)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"HTTP {code}: {message}")
        self.code = code
        self.message = message


class TransientError(Exception):
    """The connection failed: refused, reset, dropped mid-stream, timed out, garbled."""


@dataclass(frozen=True, slots=True)
class Query:
    """One collection to follow: ``resource`` in a namespace, filtered by selectors."""

    resource: str  # "services", "endpointslices" or "configmaps"
    namespace: str
    label_selector: str | None = None
    field_selector: str | None = None

    @property
    def qualified(self) -> str:
        return "endpointslices.discovery.k8s.io" if self.resource == "endpointslices" \
            else self.resource

    def __str__(self) -> str:
        selector = self.label_selector or self.field_selector or ""
        return f"{self.qualified} in {self.namespace}" + (f" ({selector})" if selector else "")


class Aborter:
    """Lets ``stop()`` close the response a blocked thread is reading from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._close: Callable[[], None] | None = None

    def attach(self, close: Callable[[], None] | None) -> None:
        with self._lock:
            self._close = close

    def abort(self) -> None:
        with self._lock:
            close = self._close
        if close is not None:
            try:
                close()
            except Exception:  # aborting is best effort
                log.debug("aborting a watch stream failed", exc_info=True)


class Transport(Protocol):
    def list(self, query: Query) -> tuple[list[Obj], str]:
        """Every matching object and the list's resourceVersion."""
        ...

    def watch(self, query: Query, resource_version: str, aborter: Aborter) -> Iterator[Obj]:
        """Open a watch (returns once connected) and iterate its events until it ends."""
        ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays: ``initial * 2**n`` capped at ``maximum``, times a jitter in [0.5, 1)."""

    initial: float = 0.5
    maximum: float = 30.0

    def delay(self, failures: int, rng: Callable[[], float] = random.random) -> float:
        base = min(self.maximum, self.initial * 2.0 ** min(failures, 30))
        return base * (0.5 + rng() / 2)


MIN_HEALTHY_STREAM = 1.0
"""Seconds a watch stream without events must last to count as healthy (no backoff)."""


class Expired(Exception):
    """The resourceVersion is gone (410): the only cure is a fresh list."""


def _verbs_for(verb: str) -> str:
    # A watch is a list first: both verbs are needed together; a get needs only itself.
    return "get" if verb == "get" else "list and watch"


def problem_line(exc: Exception, verb: str, query: Query, retrying: bool = True) -> str:
    """The one line an operator needs for an API error (named verb, resource, namespace)."""
    then = "; retrying" if retrying else ""
    if isinstance(exc, ApiStatusError) and exc.code == 403:
        return (f"Kubernetes API forbids {verb} on {query.qualified} in namespace "
                f"{query.namespace!r} ({exc.message}); grant {_verbs_for(verb)} on it to "
                f"portproxy's service account (see the RBAC in examples/){then}")
    if isinstance(exc, ApiStatusError) and exc.code == 401:
        return (f"Kubernetes API rejected the credentials for {verb} {query.qualified} in "
                f"namespace {query.namespace!r} (HTTP 401: token expired or wrong kubeconfig "
                f"user){then}")
    keeping = "; keeping the last known state, retrying" if retrying else ""
    return f"cannot {verb} {query}: {exc}{keeping}"


class Informer:
    """Follows one ``Query`` in a daemon thread and publishes the full object set on change.

    ``publish(objects, synced)`` and ``restarted()`` are called *in the thread*; the owner
    hops them onto its event loop.
    """

    def __init__(
        self,
        transport: Transport,
        query: Query,
        publish: Callable[[dict[str, Obj]], None],
        restarted: Callable[[], None] = lambda: None,
        backoff: Backoff = Backoff(),
        name: str = "kube-watch",
        on_problem: Callable[[Problem | None], None] | None = None,
    ) -> None:
        self._transport = transport
        self.query = query
        self._publish = publish
        self._restarted = restarted
        self._backoff = backoff
        self._on_problem = on_problem
        self._stop = threading.Event()
        self._aborter = Aborter()
        self._objects: dict[str, Obj] = {}
        # Where the next watch resumes: the list's resourceVersion, then that of each event
        # or bookmark applied; None means relist. It lives here rather than in a local of
        # ``_watch`` so that a stream cut part-way keeps the progress it made.
        self._resource_version: str | None = None
        # Consecutive failed attempts (drives the backoff). Also here, because a stream that
        # delivered events proves the API healthy even when it then breaks.
        self._failures = 0
        # Consecutive relists forced by an expired resourceVersion with no event between:
        # only a run of them backs off (an API answering 410 at once to every fresh list).
        self._expiries = 0
        self._problem: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._aborter.abort()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop()
        except _Stopped:
            pass
        except BaseException:  # a dying watch must say why
            log.exception("watch of %s stopped unexpectedly", self.query)

    def _loop(self) -> None:
        while not self._stop.is_set():
            verb = "list" if self._resource_version is None else "watch"
            try:
                if self._resource_version is None:
                    self._resource_version = self._relist()
                    verb = "watch"
                if self._watch(self._resource_version):
                    self._failures = 0
                    continue  # the server ended the stream at timeoutSeconds: watch again
                # Ended at once without a single event: back off quietly, never spin.
            except (ApiStatusError, Expired, TransientError) as exc:
                if self._stop.is_set():
                    return
                if _needs_relist(exc):
                    why = "410 Gone" if not isinstance(exc, ApiStatusError) or \
                        exc.code == 410 else "the API's resourceVersions went backwards"
                    log.info("resourceVersion of %s is no longer served (%s); relisting",
                             self.query, why)
                    self._resource_version = None
                    # The API answered: an outage before it is over, and its failures must
                    # not delay the relist (a 410 is how most outages end).
                    self._failures = 0
                    self._expiries += 1
                    self._restarted()
                    if self._expiries == 1:
                        continue  # a single one is routine: relist at once
                    self._sleep(self._backoff.delay(self._expiries - 1))
                    continue
                denied = isinstance(exc, ApiStatusError) and exc.code in (401, 403)
                # One line per kind of problem, not per retry: the key leaves out details
                # (ports, resourceVersions) that change from one attempt to the next.
                kind = exc.code if isinstance(exc, ApiStatusError) else str(exc).split(":")[0]
                self._report(f"{verb} {kind}", problem_line(exc, verb, self.query), denied)
            except _Stopped:
                raise
            except Exception as exc:  # a bug or an unexpected client error: never give up
                if self._stop.is_set():
                    return  # an aborted read can fail in any way
                if self._problem != repr(exc):
                    self._problem = repr(exc)
                    log.exception("unexpected error in the watch of %s; retrying", self.query)
            self._failures += 1
            self._restarted()
            self._sleep(self._backoff.delay(self._failures - 1))

    def _relist(self) -> str:
        items, resource_version = self._transport.list(self.query)
        self._check_stop()
        self._objects = {_name(o): o for o in items}
        self._recovered()
        self._publish(dict(self._objects))
        return resource_version

    def _watch(self, resource_version: str) -> bool:
        """Watch from ``resource_version`` until the stream ends; returns whether it was
        healthy (carried an event or lasted ``MIN_HEALTHY_STREAM`` seconds).

        Every event or bookmark applied moves ``_resource_version`` on at once, so if the
        stream then breaks, the retry resumes after it instead of replaying it."""
        events = 0
        started = time.monotonic()
        stream = self._transport.watch(self.query, resource_version, self._aborter)
        try:
            self._check_stop()
            self._recovered()
            for event in stream:
                self._check_stop()
                resource_version = self._apply(event, resource_version)
                self._resource_version = resource_version
                events += 1
                # The API is serving us: a break after this starts a fresh backoff streak
                # instead of climbing to the cap behind streams that all carried events.
                self._failures = self._expiries = 0
        finally:
            self._aborter.attach(None)
        return events > 0 or time.monotonic() - started >= MIN_HEALTHY_STREAM

    def _apply(self, event: Obj, resource_version: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                raise Expired()
            raise ApiStatusError(code, str(obj.get("message") or obj.get("reason") or obj))
        new_version = str((obj.get("metadata") or {}).get("resourceVersion") or resource_version)
        if kind in ("ADDED", "MODIFIED"):
            self._objects[_name(obj)] = obj
        elif kind == "DELETED":
            self._objects.pop(_name(obj), None)
        else:  # BOOKMARK (or an unknown type): only the resourceVersion moves on
            return new_version
        self._publish(dict(self._objects))
        return new_version

    def _report(self, key: str, line: str, denied: bool) -> None:
        if key == self._problem:
            log.debug("still failing: %s", line)
            return
        self._problem = key
        problem = Problem(logging.ERROR if denied else logging.WARNING, line)
        if self._on_problem is not None:
            self._on_problem(problem)  # the owner says it, naming who is affected
        else:
            log.log(problem.level, "%s", line)

    def _recovered(self) -> None:
        if self._problem is not None:
            self._problem = None
            log.info("%s is reachable again", self.query)
            if self._on_problem is not None:
                self._on_problem(None)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped()


class _Stopped(Exception):
    pass


def _needs_relist(exc: Exception) -> bool:
    """Whether ``exc`` says the watch's resourceVersion cannot be served, which only a fresh
    list cures: 410 Gone (history compacted), or an API server whose resourceVersions went
    backwards (restored etcd, replaced control plane) answering 504 "Too large resource
    version" from its watch cache, as client-go's reflector also relists on."""
    if isinstance(exc, Expired):
        return True
    if not isinstance(exc, ApiStatusError):
        return False
    return exc.code == 410 or (
        exc.code == 504 and "too large resource version" in exc.message.lower())


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


def wait_dead(informers: list[Informer], timeout: float) -> bool:
    """Block until every informer's thread ended or ``timeout`` passed (for sync callers)."""
    deadline = time.monotonic() + timeout
    for informer in informers:
        while informer.alive and time.monotonic() < deadline:
            time.sleep(0.01)
    return not any(i.alive for i in informers)
