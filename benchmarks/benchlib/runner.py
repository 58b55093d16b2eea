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


def _unavailable() -> dict[str, str]:
    unavailable = ensure_installed(allow_install=False)
    reason = forwarders.portproxy_unavailable()
    if reason:
        unavailable["portproxy"] = reason
    return unavailable


def _launch_peers(tmp: Path, settings: Settings, unavailable: dict[str, str],
                  wanted: set[str]) -> list[Running]:
    cpu = settings.pin[0] if settings.pin else None
    started = []
    for i, peer in enumerate(PEERS):
        ports = Ports.block(FORWARDER_BASE_PORT + 10 * i)
        if peer.name not in wanted:
            continue
        if settings.only and peer.name not in settings.only | set(REFERENCES):
            started.append(Running(peer, ports, "skipped", "not selected (--only)"))
            continue
        started.append(forwarders.launch(peer, ports, tmp, unavailable, cpu))
    return started


def _stop_all(peers: list[Running]) -> None:
    """Signal every forwarder first, then wait: their drains overlap instead of adding up."""
    for fwd in peers:
        for proc in fwd.procs:
            proc.terminate()
    for fwd in peers:
        fwd.stop()


def _settle_peers(peers: list[Running]) -> None:
    for running in peers:
        forwarders.settle(running)
        shown = f"{running.status}" + (f" ({running.reason})" if running.reason else "")
        print(f"  {running.peer.name:15} {shown}", flush=True)


def _measure_once(ok: list[Running], raw: report.Raw, rep: int, tools: Tools) -> None:
    # Rotate the order every repeat so no forwarder always runs first or last.
    order = ok[rep % len(ok):] + ok[:rep % len(ok)] if ok else []
    # Workloads that need a fresh process (the memory baseline) run first.
    for wl in sorted(WORKLOADS, key=lambda wl: not wl.fresh_process):
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


def _repeat(rep: int, tmp: Path, tools: Tools, unavailable: dict[str, str],
            first: list[Running] | None, raw: report.Raw) -> list[Running]:
    """One repeat with freshly started forwarders, so each repeat's memory baseline is a new
    process (a forwarder reuses the heap it grew for the previous repeat's connections).

    Returns this repeat's peers; after the first repeat only those that passed then run.
    """
    wanted = {p.peer.name for p in first if p.status == "ok"} if first else {
        p.name for p in PEERS}
    workdir = tmp / f"repeat-{rep + 1}"
    workdir.mkdir()
    with ExitStack() as stack:
        print(f"starting forwarders for repeat {rep + 1}:", flush=True)
        peers = _launch_peers(workdir, tools.settings, unavailable, wanted)
        stack.callback(_stop_all, peers)
        _settle_peers(peers)
        ok = [p for p in peers if p.status == "ok"]
        for fwd in peers:
            if fwd.status != "ok" and first is not None:
                for cell in raw[fwd.peer.name].values():
                    cell.errors.append(f"repeat {rep + 1}: {fwd.status}: {fwd.reason}")
        for fwd in ok:
            raw.setdefault(fwd.peer.name, {wl.key: report.Cell() for wl in WORKLOADS})
        _measure_once(ok, raw, rep, tools)
        for fwd in ok:
            if any(p.exited() is not None for p in fwd.tcp_procs):
                fwd.reason = "a process exited during the run: figures may be incomplete"
    return peers


def run(settings: Settings, repo: Path) -> dict[str, Any]:
    binaries = cbuild.build(settings.build_dir)
    # HAProxy refuses to start unless it can raise its own limit to fit maxconn; nginx and
    # portproxy simply inherit ours. Thousands of idle connections need it too.
    raise_fd_limit(FD_LIMIT)
    if settings.pin:
        # The harness, and everything it starts without taskset, runs on the load CPU.
        os.sched_setaffinity(0, {settings.pin[1]})
    unavailable = _unavailable()
    tools = Tools(binaries["loadgen"], settings)
    raw: report.Raw = {}
    first: list[Running] | None = None
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="portproxy-bench-")))
        for proc in _start_backends(binaries["echo_server"], tmp):
            stack.callback(proc.stop)
        for rep in range(settings.repeats):
            peers = {p.peer.name: p for p in _repeat(rep, tmp, tools, unavailable, first, raw)}
            first = first or list(peers.values())
            for fwd in first:
                again = peers.get(fwd.peer.name)
                if again and again.reason and fwd.status == again.status == "ok":
                    fwd.reason = again.reason  # a process exited during this repeat
    assert first is not None
    return report.summarize(first, raw, machine.describe(settings, repo))
