"""Run settings and the fixed port plan, in one place so every module agrees."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"

# Listeners sit below the ephemeral range set inside the namespace (see netns.py), so a
# client's outgoing connection can never take a port a forwarder wants to bind.
BACKEND_TCP_PORT = 3000
"""The C echo server's TCP port."""
BACKEND_UDP_PORT = 3000
"""The C echo server's UDP port."""
IPERF_PORT = 3201
"""iperf3 -s."""
IPERF_RCV_TIMEOUT_MS = 10_000
"""A forwarder that stalls mid-test must not hold the iperf3 server for its default 2 min."""
FORWARDER_BASE_PORT = 3300
"""Forwarder i listens on BASE + 10*i (+0 echo, +1 iperf3, +2 UDP, +3 DNS-style UDP)."""
EPHEMERAL_RANGE = (4000, 65535)
"""Wide, so connection-rate runs do not exhaust ports while TIME_WAIT is bounded."""
REFERENCES = ("direct", "haproxy", "nginx")
"""Always measured: the ratios are relative to them."""
TW_BUCKETS = 4096
"""Low-ish TIME_WAIT bound: older TIME_WAIT sockets are dropped instead of being searched."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How long and how often each workload runs."""

    quick: bool
    """Short durations, one repeat, fewer idle connections: for tests, not for numbers."""
    repeats: int
    """Rounds over every forwarder; medians are reported."""
    bulk_seconds: int
    """iperf3 -t per bulk run (full mode)."""
    bulk_bytes: str | None
    """iperf3 -n per bulk run in quick mode (bytes-bounded runs are shorter than -t 1)."""
    load_ms: int
    """Duration of each connection-rate, request/response and UDP run, milliseconds."""
    idle_conns: int
    """Idle TCP connections held open for the memory figure."""
    pin: tuple[int, int] | None
    """(forwarder CPU, load generator and backends CPU), or None to let the kernel choose."""
    out_dir: Path
    """Where latest.md and latest.json go."""
    build_dir: Path
    """Where the C programs are compiled."""
    only: frozenset[str] = frozenset()
    """Measure just these forwarders (plus the references); empty means all."""

    @staticmethod
    def make(*, quick: bool, repeats: int | None, pin: tuple[int, int] | None,
             out_dir: Path, build_dir: Path, only: frozenset[str]) -> Settings:
        if quick:
            return Settings(quick=True, repeats=repeats or 1, bulk_seconds=1,
                            bulk_bytes="128M", load_ms=300, idle_conns=500, pin=pin,
                            out_dir=out_dir, build_dir=build_dir, only=only)
        return Settings(quick=False, repeats=repeats or 3, bulk_seconds=4, bulk_bytes=None,
                        load_ms=3000, idle_conns=5000, pin=pin, out_dir=out_dir,
                        build_dir=build_dir, only=only)

    def describe_durations(self) -> str:
        bulk = f"iperf3 -n {self.bulk_bytes}" if self.bulk_bytes else f"{self.bulk_seconds} s"
        return (f"bulk {bulk}, other workloads {self.load_ms / 1000:g} s, "
                f"{self.idle_conns} idle connections")
