"""The admin endpoint: /metrics, /healthz, /readyz and /forwards on a tiny asyncio HTTP server.

It is off the data path and serves nothing but those four read-only documents: no framework,
one request per connection (``Connection: close``), a bounded request head and a read timeout,
so a slow or hostile client costs one small buffer for a few seconds at most.

Probes must get through while idle or slow clients hold connections (a kubelet that cannot
reach /healthz restarts the pod). So, as nginx does with its reusable connections, the
connection count is bounded but a full house does not refuse newcomers: a new connection evicts
the oldest one that has not sent a complete request. Probes send theirs at once, so they are
answered before they could become the oldest.

Why the default address is ``:9753`` (all addresses, port 9753): portproxy usually runs as a
DaemonSet with ``hostNetwork: true`` so it can bind node ports and interface addresses. A
hostNetwork pod's IP *is* the node IP, and the kubelet sends httpGet probes to the pod IP, so
the endpoint must listen on the node's address — a loopback-only default would make every probe
fail. Listening on all addresses also lets Prometheus scrape the pod IP. 9753 is unassigned and
far from common service ports; if it clashes, ``--admin-address HOST:PORT`` moves it and
``--admin-address none`` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from portproxy.errors import ConfigError, SetupError
from portproxy.metrics import Registry
from portproxy.sockets import sockaddr
from portproxy.spec_values import is_decimal
from portproxy.status import StatusSource, readiness

log = logging.getLogger("portproxy.admin")

DEFAULT_ADMIN_ADDRESS = ":9753"
"""All addresses, port 9753: see the module docstring for why this suits kubelet probes."""

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """Limits of the admin server; the defaults suit kubelet probes and Prometheus scrapes."""

    max_request_bytes: int = 8192
    """Largest request head (request line and headers) read; larger gets 431. Probes and
    scrapers send a few hundred bytes."""
    read_timeout: float = 2.0
    """Seconds a client may take to send its request head (it then gets 408). Probes and
    scrapers send it in one go, and the kubelet's own probe timeout defaults to 1 s; keeping
    this short frees the slots of idle connections soon."""
    write_timeout: float = 5.0
    """Seconds to send the answer and wait for the client to close its side."""
    max_clients: int = 64
    """Connections held at once, which bounds memory. When all are taken, a new connection
    evicts the oldest one that has not sent a complete request (or, if every one has, the
    oldest already answered, i.e. slow to read or to close) instead of being refused, so idle
    clients cannot lock probes out."""
    heartbeat_interval: float = 1.0
    """Seconds between heartbeats of the event-loop liveness check."""
    stall_threshold: float = 10.0
    """/healthz fails when the last heartbeat is older than this many seconds: the loop is
    stuck (a blocking call, a runaway coroutine) rather than merely busy."""
    reuse_port: bool = True
    """Set SO_REUSEPORT like the data-path listeners, so the new pod of a DaemonSet rolling out
    with ``maxSurge`` (same node, same host network) can start beside the old one instead of
    failing on the admin port."""


def parse_admin_address(text: str) -> tuple[str, int] | None:
    """``--admin-address``: ``:9753``/``*:9753``/``9753`` (all addresses), ``127.0.0.1:9753``,
    ``[::1]:9753``, or ``none`` (disabled → None). The host is ``""`` for all addresses."""
    value = text.strip()
    if value.lower() == "none":
        return None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise _bad_address(text, "expected [IPv6]:PORT")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise _bad_address(text, f"{host!r} is not an IPv6 address") from None
        return host, _admin_port(text, rest[1:])
    host, sep, port_text = value.rpartition(":")
    if not sep or host in ("", "*"):
        return "", _admin_port(text, port_text)
    if ":" in host:
        raise _bad_address(text, f"write IPv6 addresses in brackets, [{host}]:PORT")
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        raise _bad_address(text, f"{host!r} is not an IP address") from None
    return host, _admin_port(text, port_text)


def _admin_port(text: str, port_text: str) -> int:
    if not is_decimal(port_text) or not 1 <= int(port_text) <= 65535:
        raise _bad_address(text, f"port {port_text!r} is not a number in 1-65535")
    return int(port_text)


def _bad_address(text: str, why: str) -> ConfigError:
    return ConfigError(
        f"invalid --admin-address {text!r}: {why} "
        "(use :PORT, IPv4:PORT, [IPv6]:PORT or none)"
    )


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    extra_headers: tuple[tuple[str, str], ...] = ()


_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}


def _text(status: int, text: str) -> _Response:
    return _Response(status, (text + "\n").encode())


class _RequestTooLarge(Exception):
    pass


@dataclass(eq=False, slots=True)
class _Client:
    """One open connection. ``eq=False`` keeps identity hashing, so clients can be the keys of
    the accept-ordered registry."""

    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None
    requested: bool = False
    """It sent a complete request head. Its answer is written with no await in between, so
    from then on it only waits for the client to read the answer and close."""


class AdminServer:
    """Serves the admin documents; ``start()`` binds, ``stop()`` closes everything it opened."""

    def __init__(
        self, host: str, port: int, registry: Registry, status: StatusSource,
        settings: AdminSettings | None = None, clock: Callable[[], float] = time.monotonic,
        liveness: Callable[[float], str | None] | None = None,
    ) -> None:
        """``liveness``, given the stall threshold, says why /healthz must fail beyond this
        event loop's own heartbeat (a stuck ``--workers`` worker), or None."""
        self._liveness = liveness
        self._host = host
        self._port = port
        self._registry = registry
        self._status = status
        self._settings = settings or AdminSettings()
        self._clock = clock
        self._server: asyncio.Server | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._last_beat = 0.0
        self._loop_lag = 0.0
        self._clients: dict[_Client, None] = {}
        """Open connections, oldest first (a dict as an insertion-ordered set)."""
        self._tasks: set[asyncio.Task[None]] = set()
        """Every connection task still running, evicted ones included, for stop() to await."""
        self._stopping = False

    @property
    def address(self) -> str:
        host = self._host or "*"
        return f"[{host}]:{self._port}" if ":" in host else f"{host}:{self._port}"

    @property
    def bound_port(self) -> int:
        """The port actually bound (differs from the requested one when that was 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the admin server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self, claim: Callable[[socket.socket], None] | None = None) -> None:
        """Bind and serve; ``claim`` is shown the bound socket first (it may refuse it by
        raising, e.g. an address a forward serves)."""
        sock = self._bind()
        if claim is not None:
            claim(sock)
        self._stopping = False
        try:
            # A plain callback, not a coroutine: the slot is taken synchronously, so a burst of
            # accepts cannot overshoot max_clients, and no task of asyncio's own wraps the
            # connection (on 3.11 its done-callback logs a traceback when the task is cancelled).
            self._server = await asyncio.start_server(
                self._accept, sock=sock, limit=self._settings.max_request_bytes)
        except BaseException:
            sock.close()
            raise
        self._last_beat = self._clock()
        self._heartbeat = asyncio.create_task(self._beat(), name="admin-heartbeat")

    async def stop(self) -> None:
        self._stopping = True
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            self._drop(client)
        tasks = [t for t in (self._heartbeat, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        self._server = None
        self._heartbeat = None

    def _bind(self) -> socket.socket:
        try:
            return self._bind_socket()
        except OSError as exc:
            raise SetupError(
                f"cannot serve the admin endpoint on {self.address}: "
                f"{exc.strerror or exc}; choose another address with "
                "--admin-address HOST:PORT, or disable it with --admin-address none"
            ) from None

    def _bind_socket(self) -> socket.socket:
        if self._host:
            family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
            return self._listen(family, self._host, v6only=True)
        # All addresses: one dual-stack socket (one port, even when asked for port 0),
        # falling back to IPv4 alone on hosts where IPv6 is disabled.
        try:
            return self._listen(socket.AF_INET6, "::", v6only=False)
        except OSError as exc:
            if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
        return self._listen(socket.AF_INET, "0.0.0.0", v6only=True)

    def _listen(self, family: socket.AddressFamily, host: str, v6only: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._settings.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            sock.bind(sockaddr(host, self._port))
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    @property
    def loop_lag(self) -> float:
        """How late the last heartbeat woke up, in seconds: the event loop's recent lag."""
        return self._loop_lag

    async def _beat(self) -> None:
        interval = self._settings.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            now = self._clock()
            self._loop_lag = max(0.0, now - self._last_beat - interval)
            self._last_beat = now

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The server's callback for each new connection: take a slot, evicting if need be."""
        full = len(self._clients) >= self._settings.max_clients
        if self._stopping or (full and not self._evict_one()):
            writer.transport.abort()
            return
        client = _Client(writer)
        self._clients[client] = None
        client.task = asyncio.get_running_loop().create_task(
            self._serve(reader, client), name="admin-client")
        self._tasks.add(client.task)
        client.task.add_done_callback(self._tasks.discard)

    def _evict_one(self) -> bool:
        """Close the oldest connection that has not sent a complete request, else the oldest
        one at all (those have had their answer and are slow to read it or to close): they
        are the ones an idle or slowloris client holds. False when there is none to evict."""
        idle = (client for client in self._clients if not client.requested)
        victim = next(idle, None) or next(iter(self._clients), None)
        if victim is None:
            return False
        self._drop(victim)
        return True

    def _drop(self, client: _Client) -> None:
        """Free the slot and close the socket now. The abort is not left to the task's
        ``finally``: a task cancelled before its first step never runs it."""
        self._clients.pop(client, None)
        client.writer.transport.abort()
        if client.task is not None:
            client.task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, client: _Client) -> None:
        try:
            await self._exchange(reader, client)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            # A slow or vanished client: nothing to answer, nothing to log. OSError, not
            # only ConnectionError: a client gone mid-answer can make write_eof() raise
            # ENOTCONN, a plain OSError.
            pass
        finally:
            self._clients.pop(client, None)
            # Abort, not close: close() keeps the socket open until the client has read what
            # is still buffered, so a client that never reads would keep its socket and our
            # copy of the answer forever, outside any slot. After a complete exchange the
            # buffer is empty and abort closes exactly as close would.
            client.writer.transport.abort()
            with contextlib.suppress(Exception):
                await client.writer.wait_closed()

    async def _exchange(self, reader: asyncio.StreamReader, client: _Client) -> None:
        method = ""
        try:
            async with asyncio.timeout(self._settings.read_timeout):
                head = await _read_head(reader, self._settings.max_request_bytes)
        except _RequestTooLarge:
            response = _text(431, "request too large")
        except TimeoutError:
            response = _text(408, "request timeout")
        else:
            client.requested = True
            method, response = self._answer(head)
        async with asyncio.timeout(self._settings.write_timeout):
            await _send(client.writer, response, head_only=method == "HEAD")
            await _linger(reader)

    def _answer(self, head: bytes) -> tuple[str, _Response]:
        request_line = head.split(b"\n", 1)[0].rstrip(b"\r").decode("latin-1")
        parts = request_line.split(" ")
        path = origin_path(parts[1]) if len(parts) == 3 else None
        if path is None or not parts[0].isalpha():
            return "", _text(400, "bad request")
        method, _, version = parts
        if not version.startswith("HTTP/1."):
            return "", _text(505, "only HTTP/1.x is served")
        handler = self._routes().get(path)
        if handler is None:
            return method, _text(404, "not found: try /metrics, /healthz, /readyz, /forwards")
        if method not in ("GET", "HEAD"):
            return method, _Response(
                405, b"method not allowed\n", extra_headers=(("Allow", "GET, HEAD"),))
        try:
            return method, handler()
        except Exception:
            # The body stays generic: internal details are for the log, not for the network.
            log.exception("admin endpoint failed to answer %s", path)
            return method, _text(500, "internal error")

    def _routes(self) -> dict[str, Callable[[], _Response]]:
        return {
            "/metrics": self._metrics, "/healthz": self._healthz,
            "/readyz": self._readyz, "/forwards": self._forwards,
        }

    def _metrics(self) -> _Response:
        return _Response(200, self._registry.render().encode(), METRICS_CONTENT_TYPE)

    def _healthz(self) -> _Response:
        age = self._clock() - self._last_beat
        if age > self._settings.stall_threshold:
            return _text(503, f"event loop unresponsive: last heartbeat {age:.1f}s ago")
        problem = self._liveness(self._settings.stall_threshold) if self._liveness else None
        if problem:
            return _text(503, problem)
        return _text(200, "ok")

    def _readyz(self) -> _Response:
        reasons = readiness(self._status)
        if not reasons:
            return _text(200, "ready")
        return _text(503, "\n".join(reasons))

    def _forwards(self) -> _Response:
        data = [status.to_dict() for status in self._status.forward_statuses()]
        body = json.dumps(data, indent=2).encode() + b"\n"
        return _Response(200, body, "application/json")


def origin_path(target: str) -> str | None:
    """The path of a request target, without its query: origin form (``/metrics?x``), or
    absolute form (``http://host:9753/metrics``), which RFC 9112 3.2.2 says a server must
    accept; None for anything else."""
    scheme, sep, rest = target.partition("://")
    if sep and scheme.lower() in ("http", "https"):
        target = "/" + rest.partition("/")[2]
    if not target.startswith("/"):
        return None
    return target.split("?", 1)[0]


async def _read_head(reader: asyncio.StreamReader, limit: int) -> bytes:
    """The request line and headers, up to the empty line that ends them; a body is never
    read (GET/HEAD have none, and the connection closes after one answer). Lines may end in
    a bare LF, as RFC 9112 lets a server accept (``printf 'GET /healthz HTTP/1.0\\n\\n'``),
    and empty lines before the request line are skipped, as it recommends."""
    head = bytearray()
    received = 0
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise _RequestTooLarge from None
        received += len(line)
        if received > limit:
            raise _RequestTooLarge
        if line.rstrip(b"\r\n"):
            head += line
        elif head:
            return bytes(head)


async def _linger(reader: asyncio.StreamReader, budget: int = 65536) -> None:
    """Read and drop what the client still sends until it closes (bounded in bytes; the
    caller bounds the time). Closing with unread input would send an RST that can destroy
    the answer before the client reads it, e.g. a 431 to an oversized request."""
    while budget > 0:
        chunk = await reader.read(min(budget, 16384))
        if not chunk:
            return
        budget -= len(chunk)


async def _send(writer: asyncio.StreamWriter, response: _Response, head_only: bool) -> None:
    # No buffering above the kernel's: drain() returns only once the whole answer is handed
    # to the kernel, so the abort that ends every connection cannot cut it short (e.g. for a
    # client that half-closes before reading a large /metrics).
    writer.transport.set_write_buffer_limits(high=0)
    headers = [
        f"HTTP/1.1 {response.status} {_REASONS[response.status]}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.extra_headers),
    ]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(response.body)
    await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
