"""The workloads, each run against one forwarder and returning its figures."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .forwarders import Running
from .procs import cpu_seconds, raise_fd_limit, rss_kib
from .settings import HOST, IPERF_RCV_TIMEOUT_MS, Settings


class WorkloadError(Exception):
    """A run that produced no figure (the tool failed, or the forwarder broke mid-run)."""


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool
    needs_process: bool = False
    """Only meaningful when there is a forwarder process (not for the direct connection)."""


@dataclass(frozen=True, slots=True)
class Tools:
    loadgen: Path
    settings: Settings


Figures = dict[str, float | None]
Runner = Callable[[Running, Tools], Figures]


@dataclass(frozen=True, slots=True)
class Workload:
    key: str
    title: str
    metrics: tuple[Metric, ...]
    run: Runner
    udp: bool = False
    reference: str = "haproxy"
    """The peer the table's ratio column compares with (HAProxy has no UDP: nginx there)."""
    fresh_process: bool = False
    """Runs first in each repeat, against forwarders started for that repeat."""


GBPS = Metric("gbps", "Gbit/s", True)
CPU_PER_GB = Metric("cpu_s_per_gb", "CPU-s/GB", False, needs_process=True)
P50 = Metric("p50_us", "p50 µs", False)
P99 = Metric("p99_us", "p99 µs", False)


def _bulk(streams: int, reverse: bool) -> Runner:
    def run(fwd: Running, tools: Tools) -> Figures:
        s = tools.settings
        amount = ["-n", s.bulk_bytes] if s.bulk_bytes else ["-t", str(s.bulk_seconds)]
        cmd = ["iperf3", "-c", HOST, "-p", str(fwd.ports.iperf), "-P", str(streams), "-J",
               "--connect-timeout", "3000", *amount]
        if reverse:  # the client receives: bound a stall (iperf3 allows it only then)
            cmd += ["-R", "--rcv-timeout", str(IPERF_RCV_TIMEOUT_MS)]
        before = cpu_seconds(fwd.pids)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=s.bulk_seconds + 60)
        except subprocess.TimeoutExpired as exc:
            raise WorkloadError("iperf3 timed out") from exc
        cpu = cpu_seconds(fwd.pids) - before
        try:
            report = json.loads(proc.stdout)
        except json.JSONDecodeError as exc:
            raise WorkloadError(f"iperf3: {proc.stderr.strip() or 'no JSON'}") from exc
        if "error" in report:
            raise WorkloadError(f"iperf3: {report['error']}")
        received = report["end"]["sum_received"]
        gigabytes = received["bytes"] / 1e9
        return {"gbps": received["bits_per_second"] / 1e9,
                "cpu_s_per_gb": cpu / gigabytes if fwd.procs and gigabytes else None}
    return run


def _loadgen(tools: Tools, mode: str, port: int, n: int) -> dict[str, float]:
    ms = tools.settings.load_ms
    cmd = [str(tools.loadgen), mode, HOST, str(port), str(n), str(ms)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=ms / 1000 + 30)
    except subprocess.TimeoutExpired as exc:
        raise WorkloadError(f"loadgen {mode} timed out") from exc
    if proc.returncode != 0:
        raise WorkloadError(f"loadgen {mode}: {proc.stderr.strip()}")
    result: dict[str, float] = json.loads(proc.stdout)
    if result["count"] == 0:
        raise WorkloadError(f"loadgen {mode}: nothing completed ({result['errors']} errors)")
    return result


def _connrate(fwd: Running, tools: Tools) -> Figures:
    r = _loadgen(tools, "connrate", fwd.ports.echo, 50)
    return {"conn_s": r["rate"], "p50_us": r["p50_us"], "p99_us": r["p99_us"]}


def _rr(concurrency: int) -> Runner:
    def run(fwd: Running, tools: Tools) -> Figures:
        r = _loadgen(tools, "rr", fwd.ports.echo, concurrency)
        return {"req_s": r["rate"], "p50_us": r["p50_us"], "p99_us": r["p99_us"]}
    return run


def _udp(fwd: Running, tools: Tools) -> Figures:
    if fwd.ports.udp is None or not fwd.udp_ok:
        raise WorkloadError("no UDP echo through this forwarder")
    r = _loadgen(tools, "udp", fwd.ports.udp, 100)
    return {"dgram_s": r["rate"], "loss_pct": r["lost_pct"], "p99_us": r["p99_us"]}


def _udp_oneshot(fwd: Running, tools: Tools) -> Figures:
    if fwd.ports.dns is None:
        raise WorkloadError("no DNS-style UDP port on this forwarder")
    r = _loadgen(tools, "udpshot", fwd.ports.dns, 50)
    return {"qps": r["rate"], "loss_pct": r["lost_pct"], "p99_us": r["p99_us"]}


def _idle_memory(fwd: Running, tools: Tools) -> Figures:
    """Open N connections, each echoing one byte so the forwarder's backend leg is up too."""
    if not fwd.procs:
        return {"kib_per_conn": None}
    n = tools.settings.idle_conns
    raise_fd_limit(n + 1024)
    baseline = rss_kib(fwd.pids)
    socks: list[socket.socket] = []
    deadline = time.monotonic() + 60 + n / 50
    try:
        for _ in range(n):
            if time.monotonic() > deadline:
                raise WorkloadError(f"only {len(socks)} idle connections before the deadline")
            sock = socket.create_connection((HOST, fwd.ports.echo), timeout=10)
            socks.append(sock)
            sock.sendall(b"!")
            if sock.recv(1) != b"!":
                raise WorkloadError(f"no echo on idle connection {len(socks)}")
        loaded = rss_kib(fwd.pids)
    except OSError as exc:
        raise WorkloadError(f"idle connection {len(socks)}: {exc}") from exc
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
    return {"kib_per_conn": (loaded - baseline) / n}


def _bulk_workload(streams: int, reverse: bool) -> Workload:
    way = "server→client" if reverse else "client→server"
    key = f"bulk_{streams}_{'down' if reverse else 'up'}"
    return Workload(key, f"bulk TCP, {streams} stream{'s' if streams > 1 else ''}, {way} "
                    "(iperf3)", (GBPS, CPU_PER_GB), _bulk(streams, reverse))


WORKLOADS: tuple[Workload, ...] = (
    _bulk_workload(1, False),
    _bulk_workload(4, False),
    _bulk_workload(1, True),
    _bulk_workload(4, True),
    Workload("connrate_50", "connection rate, concurrency 50 (connect, 64 B echo, close)",
             (Metric("conn_s", "conn/s", True), P50, P99), _connrate),
    Workload("rr_1", "request/response 64 B, persistent, concurrency 1",
             (Metric("req_s", "req/s", True), P50, P99), _rr(1)),
    Workload("rr_64", "request/response 64 B, persistent, concurrency 64",
             (Metric("req_s", "req/s", True), P50, P99), _rr(64)),
    Workload("udp_100", "UDP 64 B datagrams from 100 client ports",
             (Metric("dgram_s", "datagrams/s", True), Metric("loss_pct", "loss %", False), P99),
             _udp, udp=True, reference="nginx"),
    Workload("udp_oneshot_50", "UDP one-shot 64 B queries, each from a new client port "
             "(DNS-style), concurrency 50",
             (Metric("qps", "queries/s", True), Metric("loss_pct", "loss %", False), P99),
             _udp_oneshot, udp=True, reference="nginx"),
    Workload("idle_memory", "idle TCP connections: RSS per connection",
             (Metric("kib_per_conn", "KiB/conn", False, needs_process=True),), _idle_memory,
             fresh_process=True),
)
