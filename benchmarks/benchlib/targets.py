"""The performance targets of the issue that asked for this benchmark, checked against a run.

Each target is a bound on one figure of one forwarder, either as a ratio to a reference peer
or as an absolute value. The report lists each as met, missed, or without a figure, so a
run says at a glance where portproxy stands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BULK = ("bulk_1_up", "bulk_4_up", "bulk_1_down", "bulk_4_down")


@dataclass(frozen=True, slots=True)
class Target:
    text: str
    forwarder: str
    workload: str
    metric: str
    reference: str | None
    """The peer the figure is divided by; None for an absolute bound."""
    at_least: float | None = None
    at_most: float | None = None
    inverse: bool = False
    """Compare the reciprocal ratio (bytes per CPU-second from CPU-seconds per GB)."""

    def needed(self) -> str:
        unit = "×" if self.reference else ""
        if self.at_least is not None:
            return f"≥ {self.at_least:g}{unit}"
        return f"≤ {self.at_most:g}{unit}"

    def measured(self, summary: dict[str, Any]) -> float | None:
        entry = summary["forwarders"].get(self.forwarder)
        if entry is None or entry["status"] != "ok":
            return None
        if self.reference is None:
            result = entry["results"].get(self.workload)
            return result["values"].get(self.metric) if result else None
        ratios = entry["ratios"].get(f"vs_{self.reference}", {})
        value: float | None = ratios.get(self.workload, {}).get(self.metric)
        if value is not None and self.inverse:
            return 1 / value if value else None
        return value

    def met(self, value: float) -> bool:
        if self.at_least is not None and value < self.at_least:
            return False
        return self.at_most is None or value <= self.at_most


TARGETS: tuple[Target, ...] = (
    *(Target("bulk throughput ≥ 1.0× HAProxy", "portproxy", wl, "gbps", "haproxy",
             at_least=1.0) for wl in BULK),
    *(Target("bytes per CPU-second ≥ 1.2× HAProxy", "portproxy", wl, "cpu_s_per_gb",
             "haproxy", at_least=1.2, inverse=True) for wl in BULK),
    Target("connection rate ≥ 0.5× HAProxy (one worker)", "portproxy", "connrate_50",
           "conn_s", "haproxy", at_least=0.5),
    Target("connection rate ≥ 0.8× HAProxy (--workers 2)", "portproxy-w2", "connrate_50",
           "conn_s", "haproxy", at_least=0.8),
    Target("request/response c64 ≥ 0.8× HAProxy req/s", "portproxy", "rr_64", "req_s",
           "haproxy", at_least=0.8),
    Target("request/response c64 p99 ≤ 1.2× HAProxy's", "portproxy", "rr_64", "p99_us",
           "haproxy", at_most=1.2),
    Target("UDP datagrams/s ≥ 1.0× nginx", "portproxy", "udp_100", "dgram_s", "nginx",
           at_least=1.0),
    Target("UDP: no loss below saturation", "portproxy", "udp_100", "loss_pct", None,
           at_most=0.0),
    Target("one-shot DNS-style queries/s ≥ 0.8× nginx", "portproxy", "udp_oneshot_50", "qps",
           "nginx", at_least=0.8),
    Target("idle connection ≤ 4 KiB", "portproxy", "idle_memory", "kib_per_conn", None,
           at_most=4.0),
    Target("idle connection below HAProxy's", "portproxy", "idle_memory", "kib_per_conn",
           "haproxy", at_most=1.0),
)


def evaluate(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        value = target.measured(summary)
        verdict = "no figure" if value is None else "met" if target.met(value) else "missed"
        rows.append({"target": target.text, "forwarder": target.forwarder,
                     "workload": target.workload, "metric": target.metric,
                     "reference": target.reference, "needed": target.needed(),
                     "measured": value, "verdict": verdict})
    return rows
