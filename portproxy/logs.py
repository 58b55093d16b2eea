"""Logging: text or JSON lines, rate-limited warnings and errors, and the access log.

``setup_logging`` installs one handler on the root logger. Only ``portproxy.*`` follows
``--log-level``; third-party loggers (kubernetes, urllib3) stay at WARNING whatever the level,
because their debug output can include API response bodies that have no place in our logs.

Extras passed as ``log.info("endpoints changed", extra={"forward": f, "added": [...]})`` become
keys of the JSON object, or ``key=value`` pairs after the text message, so lifecycle events
are machine-readable in both formats.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TextIO

from portproxy.errors import ConfigError

LEVELS = {
    "debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
    "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL,
}
LOG_FORMATS = ("text", "json")
ACCESS_LOGGER = "portproxy.access"

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message", "asctime", "taskName", "ratelimit_key", "_portproxy_summary",
}


def parse_level(text: str) -> int:
    """``--log-level`` name (any case) → logging level; unknown names are a ConfigError."""
    level = LEVELS.get(text.strip().lower())
    if level is None:
        raise ConfigError(
            f"invalid --log-level {text!r}: use one of debug, info, warning, error, critical")
    return level


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def extras(record: logging.LogRecord) -> dict[str, object]:
    """The ``extra=`` fields of a record, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then the extras (exc if any)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "ts": _timestamp(record), "level": record.levelname.lower(),
            "logger": record.name, "msg": record.getMessage(),
        }
        for key, value in extras(record).items():
            data.setdefault(key, value)  # the four core keys are never overwritten
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii keeps every line 7-bit clean; default=str copes with addresses, enums.
        return json.dumps(data, default=str)


#: Control characters as escapes, so that text from outside (a client address, an API
#: server's error message) cannot start a forged line or steer a terminal.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7f, 0xa0))}
_CONTROLS.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
                  0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` with its control characters escaped (most text has none: checked first)."""
    return text if text.isprintable() else text.translate(_CONTROLS)


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or not text.isprintable() or any(ch.isspace() or ch in '"=' for ch in text):
        return json.dumps(text)  # escapes control characters too
    return text


class TextFormatter(logging.Formatter):
    """``2026-01-02T03:04:05.678Z INFO portproxy.tcp: listener bound forward=web port=80``."""

    def format(self, record: logging.LogRecord) -> str:
        message = one_line(record.getMessage())
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {message}"
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in extras(record).items())
        if pairs:
            line = f"{line} {pairs}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


@dataclass(frozen=True, slots=True)
class RateLimit:
    """How many similar warnings/errors pass before the rest are counted instead of written."""

    burst: int = 10
    """Messages of one key written per interval; enough to see a pattern, not a flood."""
    interval: float = 60.0
    """Seconds of one window; a flood costs at most ``burst`` lines plus one summary a minute."""
    max_keys: int = 1024
    """Keys tracked at once, so messages keyed by client address cannot grow memory."""
    min_level: int = logging.WARNING
    """Records below this level (lifecycle info, the access log) are never limited."""


@dataclass(frozen=True, slots=True)
class Suppressed:
    """A window that ended with messages held back: ``count`` like ``sample`` were dropped."""

    key: Hashable
    sample: str
    count: int


@dataclass(slots=True)
class _Window:
    start: float
    sample: str
    passed: int = 0
    suppressed: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    """Write this message."""
    closed: tuple[Suppressed, ...] = ()
    """Windows that ended with suppressed messages; write one summary line for each first."""


@dataclass(slots=True)
class RateLimiter:
    """Per-key fixed windows (pure: the clock is injected)."""

    limit: RateLimit
    clock: Callable[[], float] = time.monotonic
    _windows: dict[Hashable, _Window] = field(default_factory=dict, init=False)
    _next_sweep: float = field(default=float("-inf"), init=False)

    def admit(self, key: Hashable, sample: str) -> Verdict:
        now = self.clock()
        closed = self._sweep(now) if now >= self._next_sweep else []
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.limit.interval:
            del self._windows[key]
            if window.suppressed:
                closed.append(Suppressed(key, window.sample, window.suppressed))
            window = None
        if window is None:
            if len(self._windows) >= self.limit.max_keys:
                # Windows are inserted as they open, so the first one is the oldest.
                oldest_key = next(iter(self._windows))
                oldest = self._windows.pop(oldest_key)
                if oldest.suppressed:
                    closed.append(Suppressed(oldest_key, oldest.sample, oldest.suppressed))
            window = self._windows[key] = _Window(now, sample)
        if window.passed < self.limit.burst:
            window.passed += 1
            return Verdict(True, tuple(closed))
        window.suppressed += 1
        return Verdict(False, tuple(closed))

    def flush(self, everything: bool = False) -> list[Suppressed]:
        """Close ended windows (all of them with ``everything``, e.g. at shutdown)."""
        return self._sweep(float("inf") if everything else self.clock())

    def _sweep(self, now: float) -> list[Suppressed]:
        self._next_sweep = now + self.limit.interval
        ended = [k for k, w in self._windows.items() if now - w.start >= self.limit.interval]
        closed = []
        for key in ended:
            window = self._windows.pop(key)
            if window.suppressed:
                closed.append(Suppressed(key, window.sample, window.suppressed))
        return closed


class RateLimitFilter(logging.Filter):
    """A handler filter: warnings and errors of one key pass ``burst`` times per interval,
    then a ``suppressed K similar messages`` line reports the rest when the window ends.

    The key is ``extra={"ratelimit_key": ...}`` when given, else the logger name, the
    unformatted message and the ``forward`` extra, so ``"connect to %s failed"`` is one key
    per forward whatever the address.
    """

    def __init__(self, handler: logging.Handler, limiter: RateLimiter) -> None:
        super().__init__()
        self._handler = handler
        self.limiter = limiter
        # Kubernetes watch threads log beside the event loop, and a handler runs its filters
        # before taking its own lock: without this, two threads closing the same window
        # make log.warning() itself raise (KeyError, "dict changed size during iteration").
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.limiter.limit.min_level or getattr(
                record, "_portproxy_summary", False):
            return True
        # Per forward too: a flood on one forward must not silence another's failures.
        key = getattr(record, "ratelimit_key", None) or (
            record.name, str(record.msg), getattr(record, "forward", None))
        with self._lock:
            verdict = self.limiter.admit(key, record.getMessage())
        self._report(verdict.closed, record.name)  # unlocked: it logs, through this filter
        return verdict.allowed

    def flush(self, everything: bool = False) -> None:
        """Write the summaries of ended windows (call periodically, and at shutdown)."""
        with self._lock:
            closed = tuple(self.limiter.flush(everything))
        self._report(closed, "portproxy")

    async def flush_periodically(self) -> None:
        """Flush once per window, as a task for the life of the process: otherwise a storm's
        "suppressed N" line waits for the next warning, which after the storm may never come."""
        while True:
            await asyncio.sleep(self.limiter.limit.interval)
            self.flush()

    def _report(self, closed: tuple[Suppressed, ...], default_logger: str) -> None:
        for item in closed:
            name = item.key[0] if isinstance(item.key, tuple) else default_logger
            summary = logging.makeLogRecord({
                "name": str(name), "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": "suppressed %d similar messages like: %s",
                "args": (item.count, item.sample),
                "suppressed": item.count, "_portproxy_summary": True,
            })
            self._handler.handle(summary)


_HANDLER_MARK = "_portproxy_handler"


class CredentialPluginFilter(logging.Filter):
    """The kubernetes client logs a failed kubeconfig ``exec`` credential plugin with the
    plugin's stderr, on the root logger. That output may hold secrets (a helper echoing a
    token or password), so the line keeps the failure and leaves the output out."""

    _SOURCE = os.path.join("kubernetes", "config", "kube_config.py")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and record.pathname.endswith(self._SOURCE):
            what = str(record.getMessage()).split(". ", 1)[0]
            record.msg = ("kubeconfig credential plugin failed (%s); its output is not "
                          "logged, as it may hold secrets")
            record.args = (what,)
            record.name = "kubernetes.config"
        return True


def setup_logging(
    level: str, fmt: Literal["text", "json"], stream: TextIO | None = None, *,
    rate_limit: RateLimit | None = None, clock: Callable[[], float] = time.monotonic,
) -> RateLimitFilter:
    """Install the portproxy handler on the root logger (replacing one installed before).

    Returns the rate-limit filter so the daemon can ``flush`` its summaries at shutdown.
    """
    numeric = parse_level(level)
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"invalid --log-format {fmt!r}: use text or json")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    limiter = RateLimitFilter(handler, RateLimiter(rate_limit or RateLimit(), clock))
    handler.addFilter(CredentialPluginFilter())
    handler.addFilter(limiter)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("portproxy").setLevel(numeric)
    return limiter


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One finished TCP connection or expired UDP flow."""

    protocol: Literal["tcp", "udp"]
    forward: str
    client: str
    """``host:port`` of the client (``[v6]:port`` for IPv6)."""
    endpoint: str
    """``host:port`` of the backend; empty when none was reached (denied, no endpoints)."""
    bytes_up: int
    """Client to backend."""
    bytes_down: int
    """Backend to client."""
    duration: float
    """Seconds from accept (or first datagram) to close (or expiry)."""
    result: str
    """ok, refused, timeout, denied, no_endpoints, aborted, drain_timeout, reset, expired,
    evicted…"""


class AccessLog:
    """Writes one INFO line per ``AccessRecord`` to ``portproxy.access`` when enabled.

    The access logger gets its own INFO level, so ``--access-log`` works with
    ``--log-level warning``; disabled, ``record`` returns before building anything.
    """

    def __init__(self, enabled: bool, logger: logging.Logger | None = None) -> None:
        self.enabled = enabled
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)
        if enabled:
            self._logger.setLevel(logging.INFO)

    def record(self, entry: AccessRecord) -> None:
        if not self.enabled:
            return
        what = "connection closed" if entry.protocol == "tcp" else "flow closed"
        self._logger.info(f"{entry.protocol} {what}", extra={
            "forward": entry.forward, "client": entry.client, "endpoint": entry.endpoint,
            "bytes_up": entry.bytes_up, "bytes_down": entry.bytes_down,
            "duration": round(entry.duration, 3), "result": entry.result,
        })


def format_address(address: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """A socket address as ``host:port`` or ``[v6]:port``, for ``AccessRecord`` fields."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
