"""The benchmark harness must keep running and producing every figure (never checks values).

Runs ``benchmarks/run.py --quick`` as a subprocess: it re-executes itself in a private network
namespace, so this needs root, unshare and gcc; the peers (HAProxy, nginx, socat, iperf3) are
expected to be installed already (``--no-install``), and a missing one must show as skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "benchmarks" / "run.py"

LATENCY = {"p50_us", "p99_us"}
EXPECTED: dict[str, set[str]] = {
    "bulk_1_up": {"gbps", "cpu_s_per_gb"},
    "bulk_4_up": {"gbps", "cpu_s_per_gb"},
    "bulk_1_down": {"gbps", "cpu_s_per_gb"},
    "bulk_4_down": {"gbps", "cpu_s_per_gb"},
    "connrate_50": {"conn_s"} | LATENCY,
    "rr_1": {"req_s"} | LATENCY,
    "rr_64": {"req_s"} | LATENCY,
    "udp_100": {"dgram_s", "loss_pct", "p99_us"},
    "udp_oneshot_50": {"qps", "loss_pct", "p99_us"},
    "idle_memory": {"kib_per_conn"},
}
PRIMARY = {wl: next(m for m in ("gbps", "conn_s", "req_s", "dgram_s", "qps", "kib_per_conn")
                    if m in metrics) for wl, metrics in EXPECTED.items()}
PEER_PROGRAMS = {"haproxy": "haproxy", "nginx": "nginx", "socat": "socat"}
"""Peers and their programs (nginx may also be skipped when its stream module is missing)."""
PORTPROXY = {"portproxy", "portproxy-copy", "portproxy-w2"}
# The only gaps a healthy run may have: HAProxy has no UDP; "direct" has no forwarder process.
WORKLOAD_NA = {("haproxy", "udp_100"), ("haproxy", "udp_oneshot_50")}
METRIC_NA = {("direct", "cpu_s_per_gb"), ("direct", "kib_per_conn")}


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the benchmark runs in its own network namespace)"
    for program in ("unshare", "gcc", "iperf3", "taskset", "ip"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare --net is not permitted here: {probe.stderr.decode().strip()}"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.root]


@pytest.fixture(scope="module")
def summary(tmp_path_factory: pytest.TempPathFactory) -> dict:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--quick", "--no-install", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    markdown = (out / "latest.md").read_text()
    data = json.loads((out / "latest.json").read_text())
    for workload in data["workloads"].values():
        assert workload["title"] in markdown
    return data


def test_every_workload_and_metric_is_declared(summary: dict) -> None:
    declared = {key: set(wl["metrics"]) for key, wl in summary["workloads"].items()}
    assert declared == EXPECTED


def test_every_forwarder_is_reported(summary: dict) -> None:
    forwarders = summary["forwarders"]
    assert set(forwarders) == {"direct"} | set(PEER_PROGRAMS) | PORTPROXY
    assert forwarders["direct"]["status"] == "ok"
    for name, program in PEER_PROGRAMS.items():
        # A peer is measured, or skipped because it is missing; its config never fails.
        allowed = {"ok", "skipped"} if name == "nginx" else {"ok"}
        if shutil.which(program) is None:
            allowed = {"skipped"}
        assert forwarders[name]["status"] in allowed, forwarders[name]["reason"]
    for name, entry in forwarders.items():
        assert entry["status"] in {"ok", "failed", "skipped", "unsupported"}
        if entry["status"] != "ok":
            assert entry["reason"], f"{name} is {entry['status']} without a reason"


def test_every_available_forwarder_has_every_figure(summary: dict) -> None:
    measured = {n: e for n, e in summary["forwarders"].items() if e["status"] == "ok"}
    missing = []
    for name, entry in measured.items():
        for wl, metrics in EXPECTED.items():
            result = entry["results"][wl]
            if result["not_applicable"]:
                if (name, wl) not in WORKLOAD_NA:
                    missing.append(f"{name}/{wl}: n/a ({result['not_applicable']})")
                continue
            for metric in sorted(metrics):
                value = result["values"][metric]
                if (name, metric) in METRIC_NA:
                    assert value is None and result["metric_not_applicable"][metric]
                elif not isinstance(value, int | float):
                    missing.append(f"{name}/{wl}/{metric}: {result['errors']}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("reference", ["direct", "haproxy"])
def test_ratios_are_reported(summary: dict, reference: str) -> None:
    forwarders = summary["forwarders"]
    if forwarders[reference]["status"] != "ok":
        pytest.skip(f"{reference} was not measured: {forwarders[reference]['reason']}")
    for name, entry in forwarders.items():
        if entry["status"] != "ok":
            continue
        for wl, metric in PRIMARY.items():
            if any(forwarders[n]["results"][wl]["not_applicable"] or (n, metric) in METRIC_NA
                   for n in (name, reference)):
                continue
            assert metric in entry["ratios"][f"vs_{reference}"][wl], f"{name}/{wl}"


def test_targets_have_a_figure_for_every_measured_forwarder(summary: dict) -> None:
    forwarders = summary["forwarders"]
    assert summary["targets"], "no targets evaluated"
    for row in summary["targets"]:
        assert row["verdict"] in {"met", "missed", "no figure"}
        involved = [row["forwarder"]] + ([row["reference"]] if row["reference"] else [])
        if all(forwarders[name]["status"] == "ok" for name in involved):
            assert row["verdict"] != "no figure", row
