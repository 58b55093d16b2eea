"""One benchmark run inside the namespace: backends, forwarders, alternating repeats."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from . import cbuild, forwarders, machine, report
from .forwarders import PEERS, Ports, Running
from .packages import ensure_installed
from .procs import Proc, raise_fd_limit, udp_echoes, wait_tcp
from .settings import (
    BACKEND_TCP_PORT,
    BACKEND_UDP_PORT,
    FORWARDER_BASE_PORT,
    HOST,
    IPERF_PORT,
    IPERF_RCV_TIMEOUT_MS,
    REFERENCES,
    Settings,
)
from .workloads import WORKLOADS, Tools, WorkloadError

FD_LIMIT = 1 << 17


def _start_backends(echo_server: Path, tmp: Path) -> list[Proc]:
    procs = [Proc("echo-server", [str(echo_server), str(BACKEND_TCP_PORT), str(BACKEND_UDP_PORT)],
                  tmp),
             Proc("iperf3-server", ["iperf3", "-s", "-B", HOST, "-p", str(IPERF_PORT),
                                    "--rcv-timeout", str(IPERF_RCV_TIMEOUT_MS)], tmp)]
    deadline = time.monotonic() + 10
    for port in (BACKEND_TCP_PORT, IPERF_PORT):
        error = wait_tcp(HOST, port, deadline, procs)
        if error:
            raise RuntimeError(f"backend did not start: {error}")
    if not udp_echoes(HOST, BACKEND_UDP_PORT, deadline):
        raise RuntimeError("UDP echo backend does not answer")
    return procs


def _launch_peers(tmp: Path, settings: Settings) -> list[Running]:
    unavailable = ensure_installed(allow_install=False)
    reason = forwarders.portproxy_unavailable()
    if reason:
        unavailable["portproxy"] = reason
    cpu = settings.pin[0] if settings.pin else None
    started = []
    for i, peer in enumerate(PEERS):
        base = FORWARDER_BASE_PORT + 10 * i
        ports = Ports.block(base)
        if settings.only and peer.name not in settings.only | set(REFERENCES):
            started.append(Running(peer, ports, "skipped", "not selected (--only)"))
            continue
        started.append(forwarders.launch(peer, ports, tmp, unavailable, cpu))
    return started


def _settle_peers(peers: list[Running]) -> None:
    for running in peers:
        forwarders.settle(running)
        shown = f"{running.status}" + (f" ({running.reason})" if running.reason else "")
        print(f"  {running.peer.name:15} {shown}", flush=True)


def _measure(peers: list[Running], tools: Tools) -> report.Raw:
    ok = [p for p in peers if p.status == "ok"]
    raw: report.Raw = {p.peer.name: {wl.key: report.Cell() for wl in WORKLOADS} for p in ok}
    for rep in range(tools.settings.repeats):
        # Rotate the order every repeat so no forwarder always runs first or last.
        order = ok[rep % len(ok):] + ok[:rep % len(ok)] if ok else []
        for wl in WORKLOADS:
            started = time.monotonic()
            for fwd in order:
                if report.not_applicable(fwd, wl):
                    continue
                cell = raw[fwd.peer.name][wl.key]
                try:
                    cell.repeats.append(wl.run(fwd, tools))
                except (WorkloadError, OSError, KeyError, ValueError) as exc:
                    cell.errors.append(f"repeat {rep + 1}: {exc}")
            took = time.monotonic() - started
            print(f"  repeat {rep + 1}/{tools.settings.repeats}: {wl.key} ({took:.1f} s)",
                  flush=True)
    return raw


def run(settings: Settings, repo: Path) -> dict[str, Any]:
    began = time.monotonic()
    binaries = cbuild.build(settings.build_dir)
    # HAProxy refuses to start unless it can raise its own limit to fit maxconn; nginx and
    # portproxy simply inherit ours. Thousands of idle connections need it too.
    raise_fd_limit(FD_LIMIT)
    if settings.pin:
        # The harness, and everything it starts without taskset, runs on the load CPU.
        os.sched_setaffinity(0, {settings.pin[1]})
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="portproxy-bench-")))
        backends = _start_backends(binaries["echo_server"], tmp)
        for proc in backends:
            stack.callback(proc.stop)
        print(f"starting forwarders ({time.monotonic() - began:.1f} s):", flush=True)
        peers = _launch_peers(tmp, settings)
        for fwd in peers:
            stack.callback(fwd.stop)
        _settle_peers(peers)
        print(f"measuring ({time.monotonic() - began:.1f} s):", flush=True)
        raw = _measure(peers, Tools(binaries["loadgen"], settings))
        for fwd in peers:
            if fwd.status == "ok" and any(p.exited() is not None for p in fwd.tcp_procs):
                fwd.reason = "a process exited during the run: figures may be incomplete"
    return report.summarize(peers, raw, machine.describe(settings, repo))
