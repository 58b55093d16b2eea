"""The admin endpoint over real HTTP on loopback.

The server runs on its own event loop in a thread, so the tests use the blocking stdlib HTTP
client exactly as a probe would. ``FakeStatus`` is a test double of our own ``StatusSource``
protocol whose answers the tests change between requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from portproxy.admin import AdminServer, AdminSettings, parse_admin_address
from portproxy.errors import ConfigError, SetupError
from portproxy.metrics import ProxyMetrics, Registry
from portproxy.status import ForwardStatus, StatusSource, is_ready, not_ready_lines
from tests.conftest import wait_for

TIMEOUT = 10.0


class FakeStatus:
    def __init__(self) -> None:
        self.statuses: list[ForwardStatus] = []
        self.waiting: list[str] = []

    def forward_statuses(self) -> Sequence[ForwardStatus]:
        return list(self.statuses)

    def waiting_for(self) -> Sequence[str]:
        return list(self.waiting)


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Admin:
    server: AdminServer
    metrics: ProxyMetrics
    status: FakeStatus
    clock: FakeClock
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=event_loop.run_forever, name="admin-test-loop", daemon=True)
    thread.start()
    try:
        yield event_loop
    finally:
        event_loop.call_soon_threadsafe(event_loop.stop)
        thread.join(TIMEOUT)
        event_loop.close()


@pytest.fixture
def make_admin(loop: asyncio.AbstractEventLoop) -> Iterator[Callable[..., Admin]]:
    started: list[AdminServer] = []

    def make(
        settings: AdminSettings | None = None, host: str = "127.0.0.1",
        source: StatusSource | None = None,
    ) -> Admin:
        metrics, status, clock = ProxyMetrics(Registry()), FakeStatus(), FakeClock()
        server = AdminServer(host, 0, metrics.registry, source or status, settings, clock)
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(TIMEOUT)
        started.append(server)
        return Admin(server, metrics, status, clock, server.bound_port)

    try:
        yield make
    finally:
        for server in started:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(TIMEOUT)


@pytest.fixture
def admin(make_admin: Callable[..., Admin]) -> Admin:
    return make_admin()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def fetch(url: str, method: str = "GET") -> Reply:
    # No proxy: the environment's http_proxy must never see loopback probes.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, method=method)
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            return Reply(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, dict(error.headers), error.read())


def raw(port: int, data: bytes, host: str = "127.0.0.1") -> bytes:
    """Send ``data``, half-close, and read the whole answer until the server closes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status(name: str, **changes: object) -> ForwardStatus:
    base = ForwardStatus(
        name=name, protocols=("tcp",), listen="*:80", target="web/frontend:http",
        mode="endpoints", endpoints=("10.0.0.1:8080",), bound=True, resolved=True,
        active_connections=0, udp_flows=0)
    return replace(base, **changes)  # type: ignore[arg-type]


def test_metrics_exposition_parses_with_the_reference_parser(admin: Admin) -> None:
    m = admin.metrics
    tricky = 'tcp/"quoted"\\back\nslash'
    m.connections.labels(tricky, "ok").inc(3)
    m.bytes.labels("dns", "upstream").inc(1024)
    m.active.labels("dns").set(2)
    for seconds in (0.0004, 0.003, 0.003, 7.0):
        m.connect_seconds.labels(tricky).observe(seconds)
    reply = fetch(admin.url("/metrics"))
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    assert reply.body == m.registry.render().encode()
    families = {f.name: f for f in text_string_to_metric_families(reply.body.decode())}
    [sample] = families["portproxy_connections"].samples
    assert sample.labels == {"forward": tricky, "result": "ok"}
    assert sample.value == 3
    histogram = families["portproxy_upstream_connect_seconds"]
    assert histogram.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert buckets["0.0005"] == 1
    assert buckets["0.005"] == 3
    assert buckets["5"] == 3
    assert buckets["+Inf"] == 4
    count = [s for s in histogram.samples if s.name.endswith("_count")]
    assert [(s.labels, s.value) for s in count] == [({"forward": tricky}, 4)]
    assert families["portproxy_active_connections"].samples[0].value == 2


def test_metrics_move_between_scrapes(admin: Admin) -> None:
    counter = admin.metrics.connections.labels("web", "refused")
    counter.inc()
    before = fetch(admin.url("/metrics")).body.decode()
    counter.inc(4)
    after = fetch(admin.url("/metrics")).body.decode()
    assert 'portproxy_connections_total{forward="web",result="refused"} 1\n' in before
    assert 'portproxy_connections_total{forward="web",result="refused"} 5\n' in after


def test_readyz_transitions(admin: Admin) -> None:
    assert (fetch(admin.url("/readyz")).status, fetch(admin.url("/readyz")).body) == (
        200, b"ready\n")  # no forwards: nothing to wait for
    admin.status.statuses = [status("web", resolved=False, endpoints=()), status("dns")]
    reply = fetch(admin.url("/readyz"))
    assert (reply.status, reply.body) == (503, b"forward web not ready: target not resolved yet\n")
    admin.status.statuses = [status("web"), status("dns")]
    reply = fetch(admin.url("/readyz"))
    assert (reply.status, reply.body) == (200, b"ready\n")
    admin.status.statuses = [
        status("web", bound=False, detail="listener lost"),
        status("dns", bound=False, detail="waiting for interface eth0")]
    reply = fetch(admin.url("/readyz"))
    assert (reply.status, reply.body) == (
        503, b"forward web not ready: listener lost\n"
        b"forward dns not ready: waiting for interface eth0\n")
    # No forwards yet, but a ConfigMap whose entries are to come: not ready either.
    admin.status.statuses = []
    admin.status.waiting = ["tcp-services ingress/tcp-services: not read yet"]
    reply = fetch(admin.url("/readyz"))
    assert (reply.status, reply.body) == (
        503, b"tcp-services ingress/tcp-services: not read yet\n")


def test_forwards_json(admin: Admin) -> None:
    admin.status.statuses = [
        status("web", active_connections=3),
        status("dns", protocols=("tcp", "udp"), listen="*:53", target="10.0.0.10:53",
               mode="static", endpoints=(), resolved=False, udp_flows=7,
               detail="target not resolved yet"),
    ]
    reply = fetch(admin.url("/forwards"))
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "application/json"
    assert json.loads(reply.body) == [
        {"name": "web", "protocols": ["tcp"], "listen": "*:80", "target": "web/frontend:http",
         "mode": "endpoints", "endpoints": ["10.0.0.1:8080"], "bound": True, "resolved": True,
         "active_connections": 3, "udp_flows": 0, "detail": "", "draining": False,
         "ready": True},
        {"name": "dns", "protocols": ["tcp", "udp"], "listen": "*:53", "target": "10.0.0.10:53",
         "mode": "static", "endpoints": [], "bound": True, "resolved": False,
         "active_connections": 0, "udp_flows": 7, "detail": "target not resolved yet",
         "draining": False, "ready": False},
    ]


def test_healthz_ok_while_the_loop_runs(admin: Admin) -> None:
    reply = fetch(admin.url("/healthz"))
    assert (reply.status, reply.body) == (200, b"ok\n")


def test_healthz_fails_when_the_heartbeat_is_stale(make_admin: Callable[..., Admin]) -> None:
    # The heartbeat never fires again during the test, so the fake clock alone decides.
    admin = make_admin(AdminSettings(heartbeat_interval=3600.0, stall_threshold=10.0))
    assert fetch(admin.url("/healthz")).status == 200
    admin.clock.now += 10.0
    assert fetch(admin.url("/healthz")).status == 200
    admin.clock.now += 2.5
    reply = fetch(admin.url("/healthz"))
    assert (reply.status, reply.body) == (
        503, b"event loop unresponsive: last heartbeat 12.5s ago\n")


def test_healthz_recovers_when_the_heartbeat_runs(make_admin: Callable[..., Admin]) -> None:
    admin = make_admin(AdminSettings(heartbeat_interval=0.01, stall_threshold=10.0))
    admin.clock.now += 1000.0
    # The next heartbeat records the new time; poll with a deadline until it has.
    reply = wait_for(lambda: (r := fetch(admin.url("/healthz"))).status == 200 and r,
                     what="a healthy /healthz")
    assert (reply.status, reply.body) == (200, b"ok\n")


def test_head_sends_headers_only(admin: Admin) -> None:
    admin.metrics.active.labels("web").set(1)
    body = fetch(admin.url("/metrics")).body
    answer = raw(admin.port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {len(body)}".encode() in head.split(b"\r\n")
    assert b"Connection: close" in head.split(b"\r\n")
    assert rest == b""


def test_query_string_is_ignored(admin: Admin) -> None:
    assert fetch(admin.url("/healthz?verbose=1")).body == b"ok\n"


def test_unknown_path_is_404(admin: Admin) -> None:
    reply = fetch(admin.url("/debug/pprof"))
    assert reply.status == 404
    assert reply.body == b"not found: try /metrics, /healthz, /readyz, /forwards\n"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_other_methods_are_405(admin: Admin, method: str) -> None:
    reply = fetch(admin.url("/metrics"), method=method)
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"


@pytest.mark.parametrize("request_line", [b"GARBAGE", b"GET metrics HTTP/1.1", b"GET / x y",
                                          b"GET ftp://x/healthz HTTP/1.1"])
def test_malformed_request_is_400(admin: Admin, request_line: bytes) -> None:
    assert raw(admin.port, request_line + b"\r\n\r\n").startswith(b"HTTP/1.1 400 Bad Request\r\n")


@pytest.mark.parametrize("head", [
    b"GET /healthz HTTP/1.0\n\n",
    b"GET /healthz HTTP/1.1\nHost: x\r\n\n",
    b"\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_bare_lf_line_ends_and_a_leading_empty_line_are_accepted(
    admin: Admin, head: bytes,
) -> None:
    # RFC 9112 2.2: a server may take a bare LF as a line end and should skip an empty
    # line before the request line; hand-typed probes (printf, nc) send exactly these.
    answer = raw(admin.port, head)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize("target", [b"http://127.0.0.1:9753/healthz",
                                    b"HTTP://x/healthz?probe=1"])
def test_absolute_form_targets_are_served(admin: Admin, target: bytes) -> None:
    answer = raw(admin.port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\nok\n")


def test_oversize_request_is_431_and_the_connection_closes(
    make_admin: Callable[..., Admin],
) -> None:
    admin = make_admin(AdminSettings(max_request_bytes=1024))
    huge = b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 20000 + b"\r\n\r\n"
    answer = raw(admin.port, huge)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert answer.endswith(b"\r\n\r\nrequest too large\n")
    # Just under the limit is still served.
    small = b"GET /healthz HTTP/1.1\r\nX-Padding: " + b"a" * 900 + b"\r\n\r\n"
    assert raw(admin.port, small).endswith(b"\r\n\r\nok\n")


def test_slow_client_gets_408(make_admin: Callable[..., Admin]) -> None:
    admin = make_admin(AdminSettings(read_timeout=0.2))
    with socket.create_connection(("127.0.0.1", admin.port), timeout=TIMEOUT) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")


class BrokenStatus:
    def forward_statuses(self) -> Sequence[ForwardStatus]:
        raise RuntimeError("token=s3cr3t")

    def waiting_for(self) -> Sequence[str]:
        return []


def test_internal_error_is_500_without_details(make_admin: Callable[..., Admin]) -> None:
    admin = make_admin(source=BrokenStatus())
    for path in ("/forwards", "/readyz"):
        reply = fetch(admin.url(path))
        assert (reply.status, reply.body) == (500, b"internal error\n")
    assert fetch(admin.url("/healthz")).status == 200


def test_all_addresses_serves_ipv4_and_ipv6_on_one_port(
    make_admin: Callable[..., Admin],
) -> None:
    admin = make_admin(host="")
    assert raw(admin.port, b"GET /healthz HTTP/1.1\r\n\r\n").endswith(b"\r\n\r\nok\n")
    if not socket.has_ipv6 or not _ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    answer = raw(admin.port, b"GET /healthz HTTP/1.1\r\n\r\n", host="::1")
    assert answer.endswith(b"\r\n\r\nok\n")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_bind_failure_is_a_setup_error_naming_the_flag() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        server = AdminServer("127.0.0.1", port, Registry(), FakeStatus())
        with pytest.raises(SetupError) as info:
            asyncio.run(server.start())
    assert str(info.value) == (
        f"cannot serve the admin endpoint on 127.0.0.1:{port}: Address already in use; "
        "choose another address with --admin-address HOST:PORT, or disable it with "
        "--admin-address none")


@pytest.mark.parametrize(("text", "expected"), [
    (":9753", ("", 9753)),
    ("*:9753", ("", 9753)),
    ("9753", ("", 9753)),
    ("127.0.0.1:9753", ("127.0.0.1", 9753)),
    ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9753", ("::1", 9753)),
    ("[0:0::1]:1", ("::1", 1)),
    ("none", None),
    (" NONE ", None),
])
def test_parse_admin_address(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_admin_address(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("", "port '' is not a number in 1-65535"),
    (":0", "port '0' is not a number in 1-65535"),
    (":65536", "port '65536' is not a number in 1-65535"),
    ("localhost:9753", "'localhost' is not an IP address"),
    ("::1:9753", "write IPv6 addresses in brackets, [::1]:PORT"),
    ("[::1]9753", "expected [IPv6]:PORT"),
    ("[1.2.3.4]:80", "'1.2.3.4' is not an IPv6 address"),
])
def test_parse_admin_address_errors(text: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_admin_address(text)
    assert str(info.value) == (
        f"invalid --admin-address {text!r}: {why} (use :PORT, IPv4:PORT, [IPv6]:PORT or none)")


PROBE_DEADLINE = 5.0
"""How long a probe may take to be answered: far longer than an answer takes, well under the
~10 s an idle connection used to hold its slot."""


def probe(port: int, path: str) -> bytes:
    """A kubelet-style probe: the whole request at once (no half-close), then read until the
    server closes, all within PROBE_DEADLINE. A refused or timed-out probe returns what it got."""
    deadline = time.monotonic() + PROBE_DEADLINE
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=PROBE_DEADLINE) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
            while (remaining := deadline - time.monotonic()) > 0:
                sock.settimeout(remaining)
                if not (chunk := sock.recv(65536)):
                    break
                answer += chunk
    except OSError:  # refused, reset, or the deadline passed
        pass
    return answer


def read_until_closed(sock: socket.socket) -> bytes | None:
    """What the server sent before closing ``sock``; None if it is still open after TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    answer = b""
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            if not (chunk := sock.recv(65536)):
                return answer
            answer += chunk
    except ConnectionError:  # closed with our request unread: a reset is a close too
        return answer
    except TimeoutError:
        pass
    return None


def idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections that never send anything, as a slowloris client holds them."""
    return [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(count)]


def test_probes_are_answered_while_idle_connections_fill_every_slot(
    make_admin: Callable[..., Admin],
) -> None:
    admin = make_admin(AdminSettings(max_clients=8))
    admin.status.statuses = [status("web", resolved=False, endpoints=())]
    idle = idle_connections(admin.port, 8)
    try:
        # The server accepts in connection order, so every slot is held before each probe.
        assert probe(admin.port, "/healthz").endswith(b"\r\n\r\nok\n")
        readyz = probe(admin.port, "/readyz")
        assert readyz.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert readyz.endswith(b"forward web not ready: target not resolved yet\n")
        # The first probe evicted the oldest idle connection: closed unanswered (the second
        # took the slot the first freed). The others are closed once their read timeout
        # passes, after a 408.
        answers = [read_until_closed(sock) for sock in idle]
        assert answers[0] == b""
        for answer in answers[1:]:
            assert answer is not None
            assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    finally:
        for sock in idle:
            sock.close()


def test_probes_are_answered_while_answered_clients_never_close(
    make_admin: Callable[..., Admin],
) -> None:
    admin = make_admin(AdminSettings(max_clients=4))
    lingering = idle_connections(admin.port, 4)
    try:
        for sock in lingering:
            sock.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            # Answered, and the server's side is shut; but the client never closes its own,
            # so the server waits for it (for a while) in its slot.
            assert (read_until_closed(sock) or b"").endswith(b"\r\n\r\nok\n")
        assert probe(admin.port, "/healthz").endswith(b"\r\n\r\nok\n")
        assert probe(admin.port, "/readyz").endswith(b"\r\n\r\nready\n")
    finally:
        for sock in lingering:
            sock.close()


def test_stopping_with_clients_connected_logs_no_traceback(
    make_admin: Callable[..., Admin], loop: asyncio.AbstractEventLoop,
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = make_admin()
    idle = idle_connections(admin.port, 8)
    try:
        # Answered after them, so they were accepted and are waiting for their request.
        assert probe(admin.port, "/healthz").endswith(b"\r\n\r\nok\n")
        asyncio.run_coroutine_threadsafe(admin.server.stop(), loop).result(TIMEOUT)
        for sock in idle:
            assert read_until_closed(sock) == b""
        # One more turn of the loop: anything that stop() left scheduled has run by then.
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(TIMEOUT)
    finally:
        for sock in idle:
            sock.close()
    output = caplog.text + capfd.readouterr().err
    assert "Traceback" not in output
    assert "CancelledError" not in output
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_readiness_rule_and_default_reasons() -> None:
    assert is_ready([])
    assert is_ready([status("a"), status("b")])
    assert not is_ready([status("a"), status("b", resolved=False)])
    assert not_ready_lines([
        status("a", bound=False), status("b", resolved=False), status("c"),
        status("d", bound=False, resolved=False, detail="waiting for interface eth0"),
    ]) == [
        "forward a not ready: listener not bound",
        "forward b not ready: target not resolved yet",
        "forward d not ready: waiting for interface eth0",
    ]
