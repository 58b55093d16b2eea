"""A fake Kubernetes API server speaking the real wire protocol, for the real ``kubernetes`` client.

It is a threaded HTTP/1.1 server (optionally TLS) serving just what portproxy uses:

- ``GET /api/v1/namespaces/NS/services/NAME`` (and configmaps): one object or a 404 Status.
- ``GET .../services``, ``.../configmaps``, ``/apis/discovery.k8s.io/v1/namespaces/NS/
  endpointslices`` with ``labelSelector``/``fieldSelector``: a list whose metadata carries the
  resourceVersion.
- the same with ``watch=1``: a chunked stream of ``{"type","object"}`` JSON lines that honours
  ``resourceVersion`` (replays history after it, or a 410 ERROR event — or HTTP 410 — when it
  was compacted away), ``timeoutSeconds`` (ends the stream cleanly) and
  ``allowWatchBookmarks`` (BOOKMARK events carrying only metadata.resourceVersion, exactly
  the shape that breaks typed deserialisation).

Test-side controls mutate objects (every mutation gets the next global resourceVersion and
a history entry) and inject faults: 401/403 for a verb/resource/namespace, abrupt stream
drops (no terminating chunk; all at once, or each stream after N events), stalls (a stream
goes silent but stays open), compaction, an outage (the port refuses connections) and a
restart that loses history.

A client that goes away mid-request (reset, broken pipe, refused TLS handshake) is a normal
event and ends that request quietly. Any other exception escaping a handler is a bug in this
fake: it is printed and kept in ``FakeKube.errors``, and ``serving()`` (which the fixtures
use) fails the test at teardown if there are any.
"""

from __future__ import annotations

import contextlib
import copy
import json
import select
import socket
import ssl
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]

GROUPS = {"services": "", "configmaps": "", "endpointslices": "discovery.k8s.io"}
KINDS = {"services": ("Service", "v1"), "configmaps": ("ConfigMap", "v1"),
         "endpointslices": ("EndpointSlice", "discovery.k8s.io/v1")}


# How a departed client shows up on the server side. SSL EOF/zero-return are TLS's spelling
# of a peer that closed; ConnectionError covers EPIPE, ECONNRESET and ECONNABORTED.
CLIENT_GONE: tuple[type[BaseException], ...] = (ConnectionError, ssl.SSLEOFError,
                                                ssl.SSLZeroReturnError)
STOP_JOIN_SECONDS = 5.0  # stop() waits this long for handler threads before calling it a bug


class _HandshakeFailed(Exception):
    """The client refused or abandoned the TLS handshake (e.g. it does not trust our CA)."""


def status_body(code: int, reason: str, message: str) -> Obj:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


@dataclass(frozen=True)
class Request:
    verb: str  # get, list, watch
    resource: str
    namespace: str
    name: str | None
    query: dict[str, str]
    authorization: str | None


@dataclass
class _Event:
    rv: int
    resource: str
    namespace: str
    type: str
    obj: Obj


def _matches(obj: Obj, query: dict[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, query.get("labelSelector", "").split(",")):
        key, _, value = term.replace("==", "=").partition("=")
        if labels.get(key) != value:
            return False
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        key, _, value = term.replace("==", "=").partition("=")
        if key == "metadata.name" and obj["metadata"]["name"] != value:
            return False
        if key == "metadata.namespace" and obj["metadata"]["namespace"] != value:
            return False
    return True


@dataclass
class _State:
    """Everything the API "stores"; guarded by ``FakeKube.cond``."""

    rv: int = 100
    floor: int = 0  # watches from a resourceVersion below this get 410 (history lost)
    objects: dict[tuple[str, str, str], Obj] = field(default_factory=dict)
    history: list[_Event] = field(default_factory=list)
    denied: dict[tuple[str, str, str], int] = field(default_factory=dict)  # verb,res,ns → code
    drop_gen: int = 0
    bookmark_gen: int = 0
    stalled: set[int] = field(default_factory=set)
    active_streams: set[int] = field(default_factory=set)
    running: bool = True
    error_gen: int = 0
    error_status: Obj | None = None  # sent as an ERROR event to every open stream
    hang: bool = False  # new requests get no answer at all until released
    cut_after: dict[str, int] = field(default_factory=dict)  # resource → events per stream


class FakeKube:
    """The fake API: start it, point a kubeconfig (or in-cluster env) at ``url``, drive it."""

    def __init__(self, token: str = "test-token",
                 tls: tuple[str, str] | None = None, gone_as_http: bool = False,
                 pieces_per_event: int = 1) -> None:
        self.token = token
        self.pieces_per_event = pieces_per_event
        self.tls = tls
        self.gone_as_http = gone_as_http
        self.cond = threading.Condition()
        self.state = _State()
        self.requests: list[Request] = []
        self.port = 0
        # Tracebacks of exceptions that escaped a handler and were not a client going away.
        self.errors: list[str] = []
        self.departures = 0  # requests that ended because the client went away
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._handlers: dict[threading.Thread, socket.socket] = {}
        self._next_stream = 0

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"api": self})
        server = _Server(("127.0.0.1", self.port), handler, self)
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            server.socket = context.wrap_socket(server.socket, server_side=True,
                                                do_handshake_on_connect=False)
        self.port = server.server_address[1]
        with self.cond:
            self.state.running = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fakeapi", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Outage: close the port (connections are refused) and cut every open connection.

        Returns once every handler thread has ended, so ``errors`` is complete afterwards.
        """
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()  # the port now refuses; handler threads are joined below
        with self.cond:
            self.state.running = False
            self.cond.notify_all()
            handlers = dict(self._handlers)
        for conn in handlers.values():
            _abort(conn)
        if self._thread:
            self._thread.join(STOP_JOIN_SECONDS)
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in handlers if t.is_alive()]
        if stuck:  # every wait in a handler watches `running`: one that ignores it is a bug
            self._record_error(f"handler threads {stuck} still running "
                               f"{STOP_JOIN_SECONDS}s after stop()\n")

    @contextlib.contextmanager
    def serving(self) -> Iterator[FakeKube]:
        """Start, yield, stop; then fail if any handler hit an unexpected exception."""
        self.start()
        try:
            yield self
        except BaseException as error:  # keep the test's own failure, mention ours
            self.stop()
            if self.errors:
                error.add_note(self._errors_report())
            raise
        self.stop()
        self.assert_no_errors()

    def assert_no_errors(self) -> None:
        if self.errors:
            raise AssertionError(self._errors_report())

    def _errors_report(self) -> str:
        with self.cond:
            errors = list(self.errors)
        return (f"the fake API server hit {len(errors)} unexpected handler exception(s):\n"
                + "\n".join(errors))

    def restart(self) -> None:
        """An API server restart whose watch cache starts empty: old resourceVersions → 410."""
        self.stop()
        self.compact()
        self.start()

    # --- objects ---------------------------------------------------------------------------

    def _put(self, resource: str, obj: Obj, kind: str | None = None) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (resource, meta["namespace"], meta["name"])
        with self.cond:
            existed = key in self.state.objects
            if kind == "DELETED" and not existed:
                raise KeyError(key)
            self.state.rv += 1
            meta["resourceVersion"] = str(self.state.rv)
            meta.setdefault("uid", f"uid-{resource}-{meta['name']}")
            obj["kind"], obj["apiVersion"] = KINDS[resource]
            event_type = kind or ("MODIFIED" if existed else "ADDED")
            if event_type == "DELETED":
                del self.state.objects[key]
            else:
                self.state.objects[key] = obj
            self.state.history.append(
                _Event(self.state.rv, resource, key[1], event_type, copy.deepcopy(obj)))
            self.cond.notify_all()
        return obj

    def apply(self, resource: str, obj: Obj) -> Obj:
        return self._put(resource, obj)

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self.cond:
            obj = self.state.objects[(resource, namespace, name)]
        self._put(resource, obj, "DELETED")

    def service(self, namespace: str, name: str, ports: list[Obj],
                cluster_ip: str = "10.96.0.10", **spec: Any) -> Obj:
        body = {"metadata": {"namespace": namespace, "name": name},
                "spec": {"ports": ports, "clusterIP": cluster_ip, "type": "ClusterIP", **spec}}
        return self.apply("services", body)

    def endpoint_slice(self, namespace: str, service: str, name: str,
                       endpoints: list[Obj] | None, ports: list[Obj],
                       address_type: str = "IPv4") -> Obj:
        body = {"metadata": {"namespace": namespace, "name": name,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": address_type, "endpoints": endpoints, "ports": ports}
        return self.apply("endpointslices", body)

    def configmap(self, namespace: str, name: str, data: dict[str, str]) -> Obj:
        return self.apply("configmaps",
                          {"metadata": {"namespace": namespace, "name": name}, "data": data})

    # --- faults ----------------------------------------------------------------------------

    def deny(self, verb: str, resource: str, namespace: str, code: int = 403) -> None:
        with self.cond:
            self.state.denied[(verb, resource, namespace)] = code

    def allow(self, verb: str, resource: str, namespace: str) -> None:
        with self.cond:
            self.state.denied.pop((verb, resource, namespace), None)

    def drop_watches(self) -> None:
        """Cut every open watch stream mid-flight: no terminating chunk, just a closed socket."""
        with self.cond:
            self.state.drop_gen += 1
            self.cond.notify_all()

    def stall_watches(self) -> int:
        """Open streams go silent (events are held back) but stay connected; returns how many."""
        with self.cond:
            self.state.stalled |= self.state.active_streams
            self.cond.notify_all()
            return len(self.state.stalled)

    def compact(self) -> None:
        """Forget history: a watch from any older resourceVersion now gets 410 Gone."""
        with self.cond:
            self.state.floor = self.state.rv
            self.state.history = [e for e in self.state.history if e.rv > self.state.floor]

    def send_error_event(self, code: int, message: str) -> None:
        """Every open stream gets an ERROR event with this Status, then ends."""
        with self.cond:
            self.state.error_gen += 1
            self.state.error_status = status_body(code, "InternalError", message)
            self.cond.notify_all()

    def hang_requests(self, hang: bool) -> None:
        """While on, requests are read but never answered (an API that accepts and stalls)."""
        with self.cond:
            self.state.hang = hang
            self.cond.notify_all()

    def cut_watches_after(self, resource: str, events: int | None) -> None:
        """Every watch stream of ``resource`` is cut like ``drop_watches`` (no terminating
        chunk) as soon as it has sent ``events`` events, open ones included; None stops it.

        A flaky load balancer in front of the API: each stream makes some progress, then
        breaks part-way."""
        with self.cond:
            if events is None:
                self.state.cut_after.pop(resource, None)
            else:
                self.state.cut_after[resource] = events

    def _cut_due(self, resource: str, sent: int) -> bool:
        with self.cond:
            limit = self.state.cut_after.get(resource)
        return limit is not None and sent >= limit

    def _wait_unhung(self) -> None:
        with self.cond:
            while self.state.hang and self.state.running:
                self.cond.wait(0.05)

    def send_bookmarks(self) -> None:
        with self.cond:
            self.state.bookmark_gen += 1
            self.cond.notify_all()

    # --- observation -----------------------------------------------------------------------

    def active_watches(self) -> int:
        with self.cond:
            return len(self.state.active_streams)

    def count(self, verb: str, resource: str | None = None) -> int:
        with self.cond:
            return sum(1 for r in self.requests
                       if r.verb == verb and (resource is None or r.resource == resource))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0,
                 what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.01)

    # --- serving (handler thread side) -----------------------------------------------------

    def _track(self, thread: threading.Thread, conn: socket.socket) -> None:
        # Called from the accept loop, so by the time stop()'s shutdown() returns every
        # accepted connection is here to be cut, including TLS ones still handshaking.
        with self.cond:
            self._handlers[thread] = conn

    def _untrack(self, thread: threading.Thread) -> None:
        with self.cond:
            self._handlers.pop(thread, None)

    def _record_error(self, text: str) -> None:
        with self.cond:
            self.errors.append(text)

    def _departed(self) -> None:
        with self.cond:
            self.departures += 1

    def _check(self, request: Request) -> tuple[int, Obj] | None:
        with self.cond:
            self.requests.append(request)
            scheme, _, credentials = (request.authorization or "").partition(" ")
            if scheme.lower() != "bearer" or credentials != self.token:  # scheme: any case
                return 401, status_body(401, "Unauthorized", "Unauthorized")
            code = self.state.denied.get((request.verb, request.resource, request.namespace))
        if code is None:
            return None
        group = GROUPS[request.resource]
        message = (f'{request.resource}{"." + group if group else ""} is forbidden: User '
                   f'"system:serviceaccount:portproxy:portproxy" cannot {request.verb} '
                   f'resource "{request.resource}" in API group "{group}" in the namespace '
                   f'"{request.namespace}"')
        if code == 401:
            return 401, status_body(401, "Unauthorized", "Unauthorized")
        return code, status_body(code, "Forbidden", message)

    def _get(self, request: Request) -> tuple[int, Obj]:
        with self.cond:
            assert request.name is not None
            obj = self.state.objects.get((request.resource, request.namespace, request.name))
        if obj is None:
            group = GROUPS[request.resource]
            what = f"{request.resource}{'.' + group if group else ''}"
            return 404, status_body(404, "NotFound", f'{what} "{request.name}" not found')
        return 200, obj

    def _list(self, request: Request) -> Obj:
        with self.cond:
            items = [copy.deepcopy(o) for (res, ns, _), o in sorted(self.state.objects.items())
                     if res == request.resource and ns == request.namespace
                     and _matches(o, request.query)]
            kind, api_version = KINDS[request.resource]
            return {"kind": f"{kind}List", "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(self.state.rv)}, "items": items}

    def _too_old(self, request: Request) -> bool:
        rv = request.query.get("resourceVersion", "")
        with self.cond:
            return rv not in ("", "0") and int(rv) < self.state.floor

    def _stream(self, request: Request, stream_id: int,
                client_gone: Callable[[], bool]) -> Iterator[Obj | str]:
        """Watch events as dicts; the string "drop" means cut the connection now."""
        query = request.query
        deadline = time.monotonic() + float(query.get("timeoutSeconds", "1800"))
        bookmarks = query.get("allowWatchBookmarks") in ("true", "1", "True")
        rv = query.get("resourceVersion", "")
        with self.cond:
            drop_gen, bookmark_gen = self.state.drop_gen, self.state.bookmark_gen
            error_gen = self.state.error_gen
            if rv in ("", "0"):
                cursor = self.state.rv
                initial = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for (res, ns, _), o in sorted(self.state.objects.items())
                           if res == request.resource and ns == request.namespace
                           and _matches(o, query)]
            else:
                cursor, initial = int(rv), []
        yield from initial
        while True:
            with self.cond:
                while True:
                    if not self.state.running or self.state.drop_gen != drop_gen:
                        yield "drop"
                        return
                    if stream_id in self.state.stalled:
                        # A black-holed connection: nothing more arrives, not even the
                        # end of the stream at timeoutSeconds; only the client can give up.
                        self.cond.wait(0.5)
                        continue
                    if self.state.error_gen != error_gen and self.state.error_status:
                        yield {"type": "ERROR", "object": copy.deepcopy(self.state.error_status)}
                        return
                    pending = [e for e in self.state.history if e.rv > cursor]
                    if pending or self.state.bookmark_gen != bookmark_gen:
                        break
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or client_gone():
                        return
                    self.cond.wait(min(remaining, 0.05))
                events = [e for e in pending if e.resource == request.resource
                          and e.namespace == request.namespace and _matches(e.obj, query)]
                cursor = max([cursor, *[e.rv for e in pending]])
                send_bookmark = bookmarks and self.state.bookmark_gen != bookmark_gen
                bookmark_gen = self.state.bookmark_gen
                current = self.state.rv
            for event in events:
                yield {"type": event.type, "object": copy.deepcopy(event.obj)}
            if send_bookmark:
                kind, api_version = KINDS[request.resource]
                yield {"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": str(current)}}}

    def _open_stream(self) -> int:
        with self.cond:
            self._next_stream += 1
            self.state.active_streams.add(self._next_stream)
            return self._next_stream

    def _close_stream(self, stream_id: int) -> None:
        with self.cond:
            self.state.active_streams.discard(stream_id)
            self.state.stalled.discard(stream_id)


def _abort(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _Server(ThreadingHTTPServer):
    """Tracks its handler threads and sorts what escapes them: departures vs. bugs."""

    daemon_threads = True
    block_on_close = False  # FakeKube.stop() cuts connections first, then joins (bounded)

    def __init__(self, address: tuple[str, int], handler: type[_Handler],
                 api: FakeKube) -> None:
        super().__init__(address, handler)
        self.api = api

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address),
                                  name=f"fakeapi-{client_address[1]}", daemon=True)
        self.api._track(thread, request)
        thread.start()

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.api._untrack(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called inside the ``except`` that caught what escaped the handler.
        error = sys.exc_info()[1]
        if isinstance(error, (*CLIENT_GONE, _HandshakeFailed)):
            self.api._departed()
            return
        text = traceback.format_exc()
        self.api._record_error(text)
        print(f"fake API server: unexpected handler exception\n{text}", file=sys.stderr)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    api: FakeKube

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(5)
            try:
                self.request.do_handshake()
            except OSError as error:  # SSLError, reset, timeout: the client never arrived
                raise _HandshakeFailed(str(error)) from error
            self.request.settimeout(None)
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output readable

    def _send_json(self, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _parse(self) -> Request | None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        segments = [s for s in parts.path.split("/") if s]
        if segments[:2] == ["api", "v1"]:
            rest = segments[2:]
        elif segments[:3] == ["apis", "discovery.k8s.io", "v1"]:
            rest = segments[3:]
        else:
            return None
        if len(rest) not in (3, 4) or rest[0] != "namespaces" or rest[2] not in GROUPS:
            return None
        name = rest[3] if len(rest) == 4 else None
        watch = query.get("watch") in ("1", "true", "True")
        verb = "get" if name else ("watch" if watch else "list")
        return Request(verb, rest[2], rest[1], name, query, self.headers.get("Authorization"))

    def do_GET(self) -> None:
        request = self._parse()
        if request is None:
            self._send_json(404, status_body(404, "NotFound", "the server could not find "
                                             "the requested resource"))
            return
        refused = self.api._check(request)
        self.api._wait_unhung()
        if refused:
            self._send_json(*refused)
        elif request.verb == "get":
            self._send_json(*self.api._get(request))
        elif request.verb == "list":
            self._send_json(200, self.api._list(request))
        elif self.api._too_old(request) and self.api.gone_as_http:
            self._send_json(410, status_body(410, "Expired", "too old resource version"))
        else:
            self._watch(request)

    def _watch(self, request: Request) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        stream_id = self.api._open_stream()
        try:
            if self.api._too_old(request):
                rv = request.query.get("resourceVersion")
                gone = status_body(410, "Expired", f"too old resource version: {rv}")
                self._chunk({"type": "ERROR", "object": gone})
            else:
                items = self.api._stream(request, stream_id, self._client_gone)
                for sent, item in enumerate(items, start=1):
                    if item == "drop":
                        self.close_connection = True
                        _abort(self.connection)
                        return
                    assert isinstance(item, dict)
                    self._chunk(item)
                    if self.api._cut_due(request.resource, sent):
                        self.close_connection = True
                        _abort(self.connection)
                        return
            self.wfile.write(b"0\r\n\r\n")
        except CLIENT_GONE:
            self.close_connection = True  # the client went away: nobody to stream to
            self.api._departed()
        finally:
            self.api._close_stream(stream_id)

    def _client_gone(self) -> bool:
        """The client closed its end (it aborted the watch): stop streaming to nobody."""
        if isinstance(self.connection, ssl.SSLSocket):
            return False  # cannot peek through TLS; the stream ends at timeoutSeconds
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return bool(self.connection.recv(1, socket.MSG_PEEK) == b"")
        except OSError:
            return True

    def _chunk(self, event: Obj) -> None:
        data = json.dumps(event).encode() + b"\n"
        # Optionally cut each event over several chunks: HTTP framing owes nothing to lines.
        step = max(1, len(data) // self.api.pieces_per_event)
        for start in range(0, len(data), step):
            piece = data[start:start + step]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
