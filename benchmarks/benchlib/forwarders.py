"""The forwarders compared: how each is configured, started, checked and stopped."""

from __future__ import annotations

import functools
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .check import half_close_check
from .packages import nginx_stream_module
from .procs import Proc, udp_echoes, wait_tcp
from .settings import BACKEND_TCP_PORT, BACKEND_UDP_PORT, HOST, IPERF_PORT

REPO = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 15.0
"""Seconds a forwarder gets to accept connections (portproxy imports kubernetes: not instant)."""


@dataclass(frozen=True, slots=True)
class Ports:
    """Where a forwarder listens. Every UDP port forwards to the UDP echo server."""

    echo: int
    """TCP to the echo server."""
    iperf: int
    """TCP to iperf3 -s."""
    udp: int | None
    """UDP with long-lived flows."""
    dns: int | None
    """UDP set up as for DNS: one-second idle timeout, one response per query where the
    forwarder has such a setting (nginx proxy_responses)."""

    @staticmethod
    def block(base: int) -> Ports:
        return Ports(base, base + 1, base + 2, base + 3)

    def tcp_only(self) -> Ports:
        return Ports(self.echo, self.iperf, None, None)


BACKEND_PORTS = Ports(BACKEND_TCP_PORT, IPERF_PORT, BACKEND_UDP_PORT, BACKEND_UDP_PORT)
DNS_IDLE_SECONDS = 1
"""The old proxy-to-service image's DNS example used a 1 s timeout."""


@dataclass(frozen=True, slots=True)
class Launch:
    """One program of a forwarder."""

    argv: list[str]
    udp_only: bool = False
    """Serves only the UDP port: if it cannot start, the TCP figures are still measured."""


Commands = Callable[[Ports, Path], list[Launch]]
"""Given the listen ports and a private temp dir (for config files), the programs to start."""


@dataclass(frozen=True, slots=True)
class Peer:
    name: str
    """Key in the JSON and the table."""
    label: str
    """What the table's reader needs to know about its setup."""
    commands: Commands | None
    """None for the direct connection (no forwarder)."""
    udp: bool
    """Whether it forwards UDP at all."""
    needs: str | None = None
    """A program from packages.REQUIREMENTS that must be present."""
    cwd: Path | None = None


@dataclass(slots=True)
class Running:
    """A peer after start-up: its processes and whether it passed the half-close check."""

    peer: Peer
    ports: Ports
    status: str
    """ok | failed | skipped | unsupported"""
    reason: str | None = None
    procs: list[Proc] = field(default_factory=list)
    tcp_procs: list[Proc] = field(default_factory=list)
    """The programs serving the TCP ports (the ones that must start)."""
    udp_ok: bool = False
    """A probe datagram came back through the UDP port."""
    udp_missing: str | None = None
    """Why this forwarder has no UDP port at all (then the UDP workload is not applicable)."""

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


PORTPROXY = [sys.executable, "-m", "portproxy"]


@functools.cache
def _portproxy_run_flags() -> frozenset[str]:
    """The flags ``portproxy run`` knows, so optional ones are passed only when they exist."""
    try:
        proc = subprocess.run([*PORTPROXY, "run", "--help"], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(re.findall(r"--[a-z][a-z-]*", proc.stdout))


def _portproxy(*extra: str) -> Commands:
    """portproxy with ``extra`` flags; a build without them exits 2 and the row says so."""

    def commands(ports: Ports, _tmp: Path) -> list[Launch]:
        optional = [arg for flag, value in (("--admin-address", "none"),
                                            ("--log-level", "warning"))
                    if flag in _portproxy_run_flags() for arg in (flag, value)]
        run = [*PORTPROXY, "run", *optional, *extra]
        # UDP in a process of its own, so a build without UDP still gets its TCP figures.
        return [
            Launch([*run, "-f", f"tcp://{HOST}:{ports.echo}={HOST}:{BACKEND_TCP_PORT}",
                    "-f", f"tcp://{HOST}:{ports.iperf}={HOST}:{IPERF_PORT}"]),
            Launch([*run, "-f", f"udp://{HOST}:{ports.udp}={HOST}:{BACKEND_UDP_PORT}",
                    "-f", f"udp://{HOST}:{ports.dns}={HOST}:{BACKEND_UDP_PORT},"
                          f"idle-timeout={DNS_IDLE_SECONDS}s,responses=1"],
                   udp_only=True),
        ]
    return commands


def _max_conns(fds_per_conn: float) -> int:
    """Connections a forwarder may hold within our hard fd limit.

    HAProxy refuses to start if it cannot raise its limit to fit maxconn (2 sockets per
    connection plus maxconn/4 splice pipes of 2 descriptors each), and containers often deny
    raising the hard limit (no CAP_SYS_RESOURCE).
    """
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 40000
    return min(40000, int((hard - 500) / fds_per_conn))


def _haproxy(ports: Ports, tmp: Path) -> list[Launch]:
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(f"""\
global
    maxconn {_max_conns(2.5)}
defaults
    mode tcp
    maxconn {_max_conns(2.5)}
    option splice-auto
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen echo
    bind {HOST}:{ports.echo}
    server s1 {HOST}:{BACKEND_TCP_PORT}
listen iperf
    bind {HOST}:{ports.iperf}
    server s1 {HOST}:{IPERF_PORT}
""")
    return [Launch(["haproxy", "-db", "-f", str(cfg)])]


def _nginx(ports: Ports, tmp: Path) -> list[Launch]:
    module = nginx_stream_module()
    load = f"load_module {module};\n" if isinstance(module, Path) else ""
    cfg = tmp / "nginx.conf"
    cfg.write_text(f"""\
{load}daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile {2 * _max_conns(2) + 100};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections {_max_conns(2)}; }}
stream {{
    proxy_timeout 1h;
    proxy_half_close on;
    server {{ listen {HOST}:{ports.echo} reuseport backlog=4096;
             proxy_pass {HOST}:{BACKEND_TCP_PORT}; }}
    server {{ listen {HOST}:{ports.iperf} reuseport; proxy_pass {HOST}:{IPERF_PORT}; }}
    server {{ listen {HOST}:{ports.udp} udp reuseport; proxy_timeout 10s;
             proxy_pass {HOST}:{BACKEND_UDP_PORT}; }}
    server {{ listen {HOST}:{ports.dns} udp reuseport; proxy_timeout {DNS_IDLE_SECONDS}s;
             proxy_responses 1; proxy_pass {HOST}:{BACKEND_UDP_PORT}; }}
}}
""")
    return [Launch(["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"),
                    "-c", str(cfg)])]


def _socat(ports: Ports, _tmp: Path) -> list[Launch]:
    return [
        Launch(["socat", f"TCP-LISTEN:{ports.echo},bind={HOST},fork,reuseaddr,backlog=4096",
                f"TCP:{HOST}:{BACKEND_TCP_PORT}"]),
        Launch(["socat", f"TCP-LISTEN:{ports.iperf},bind={HOST},fork,reuseaddr",
                f"TCP:{HOST}:{IPERF_PORT}"]),
        # -T: a forked UDP child ends once its client is quiet, or they would pile up.
        Launch(["socat", "-T", "5", f"UDP-LISTEN:{ports.udp},bind={HOST},fork,reuseaddr",
                f"UDP:{HOST}:{BACKEND_UDP_PORT}"], udp_only=True),
        Launch(["socat", "-T", str(DNS_IDLE_SECONDS),
                f"UDP-LISTEN:{ports.dns},bind={HOST},fork,reuseaddr",
                f"UDP:{HOST}:{BACKEND_UDP_PORT}"], udp_only=True),
    ]


PEERS: tuple[Peer, ...] = (
    Peer("direct", "direct (no proxy)", None, udp=True),
    Peer("portproxy", "portproxy (splice)", _portproxy(), udp=True, needs="portproxy",
         cwd=REPO),
    Peer("portproxy-copy", "portproxy --no-splice", _portproxy("--no-splice"), udp=True,
         needs="portproxy", cwd=REPO),
    Peer("portproxy-w2", "portproxy --workers 2", _portproxy("--workers", "2"), udp=True,
         needs="portproxy", cwd=REPO),
    Peer("haproxy", "HAProxy mode tcp, splice-auto", _haproxy, udp=False, needs="haproxy"),
    Peer("nginx", "nginx stream, 2 workers, reuseport", _nginx, udp=True, needs="nginx"),
    Peer("socat", "socat fork", _socat, udp=True, needs="socat"),
)


def portproxy_unavailable() -> str | None:
    """None when ``python -m portproxy`` runs here, else why not."""
    try:
        proc = subprocess.run([*PORTPROXY, "--version"], cwd=REPO,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"portproxy not available: {exc}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"portproxy not available ({sys.executable} -m portproxy --version: {last})"
    return None


def launch(peer: Peer, ports: Ports, tmp: Path, unavailable: dict[str, str],
           cpu: int | None) -> Running:
    """Start a peer's programs without waiting for them (all peers start up in parallel)."""
    if peer.commands is None:
        return Running(peer, BACKEND_PORTS, "ok")
    if peer.needs in unavailable:
        return Running(peer, ports, "skipped", unavailable[peer.needs])
    workdir = tmp / peer.name
    workdir.mkdir()
    launches = peer.commands(ports, workdir)
    procs = [Proc(f"{peer.name}-{i}", launch.argv, workdir, cpu=cpu, cwd=peer.cwd)
             for i, launch in enumerate(launches)]
    return Running(peer, ports if peer.udp else ports.tcp_only(), "ok",
                   procs=procs,
                   tcp_procs=[p for p, la in zip(procs, launches, strict=True) if not la.udp_only])


def settle(running: Running) -> None:
    """Wait until a launched peer accepts, and gate it on the 1 MiB half-close check."""
    if running.status != "ok":
        return
    deadline = time.monotonic() + START_TIMEOUT
    for port in (running.ports.echo, running.ports.iperf):
        error = wait_tcp(HOST, port, deadline, running.tcp_procs)
        if error:
            # Exit code 2 is "invalid usage": a flag this build does not know yet.
            unsupported = any(p.exited() == 2 for p in running.procs)
            running.status = "unsupported" if unsupported else "failed"
            running.reason = error
            running.stop()
            return
    error = half_close_check(HOST, running.ports.echo)
    if error:
        running.status, running.reason = "failed", f"1 MiB half-close check: {error}"
        running.stop()
        return
    if running.ports.udp is None:
        running.udp_missing = f"{running.peer.name} does not forward UDP"
        return
    running.udp_ok = udp_echoes(HOST, running.ports.udp, deadline, running.procs)
    dead = [p for p in running.procs if p.exited() is not None]
    if not running.udp_ok and dead:
        running.udp_missing = f"UDP forward did not start: {dead[0].log_tail(2)}"
