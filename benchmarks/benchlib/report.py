"""Medians, ratios, and the markdown and JSON outputs."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import targets
from .forwarders import Running
from .settings import REFERENCES
from .workloads import WORKLOADS, Figures, Metric, Workload


@dataclass(slots=True)
class Cell:
    """Every repeat of one workload against one forwarder."""

    repeats: list[Figures] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


Raw = dict[str, dict[str, Cell]]
"""forwarder → workload → cell"""


def not_applicable(fwd: Running, workload: Workload) -> str | None:
    return fwd.udp_missing if workload.udp else None


def _median(cell: Cell, metric: Metric) -> float | None:
    values = [r[metric.key] for r in cell.repeats if r.get(metric.key) is not None]
    return statistics.median(v for v in values if v is not None) if values else None


def summarize(peers: list[Running], raw: Raw, meta: dict[str, Any]) -> dict[str, Any]:
    forwarders: dict[str, Any] = {}
    for fwd in peers:
        results: dict[str, Any] = {}
        if fwd.status == "ok":
            for wl in WORKLOADS:
                cell = raw[fwd.peer.name][wl.key]
                values = {m.key: _median(cell, m) for m in wl.metrics}
                missing = {m.key: "no forwarder process" for m in wl.metrics
                           if m.needs_process and not fwd.procs}
                results[wl.key] = {"values": values,
                                   "not_applicable": not_applicable(fwd, wl),
                                   "metric_not_applicable": missing,
                                   "errors": cell.errors, "repeats": cell.repeats}
        forwarders[fwd.peer.name] = {"label": fwd.peer.label, "status": fwd.status,
                                     "reason": fwd.reason, "results": results}
    for entry in forwarders.values():
        entry["ratios"] = {f"vs_{ref}": _ratios(entry, forwarders.get(ref)) for ref in REFERENCES}
    workloads = {wl.key: {"title": wl.title, "reference": wl.reference,
                          "metrics": {m.key: {"label": m.label,
                                              "higher_is_better": m.higher_is_better}
                                      for m in wl.metrics}}
                 for wl in WORKLOADS}
    summary: dict[str, Any] = {"meta": meta, "workloads": workloads, "forwarders": forwarders}
    summary["targets"] = targets.evaluate(summary)
    return summary


def _ratios(entry: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    if ref is None or ref["status"] != "ok":
        return out
    for wl_key, result in entry["results"].items():
        ref_values = ref["results"][wl_key]["values"]
        ratios = {k: v / ref_values[k] for k, v in result["values"].items()
                  if v is not None and ref_values.get(k)}
        if ratios:
            out[wl_key] = ratios
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(entry: dict[str, Any], ref: str, wl: str, metric: str) -> str:
    value = entry["ratios"][f"vs_{ref}"].get(wl, {}).get(metric)
    return "–" if value is None else f"{value:.2f}×"


def _workload_table(summary: dict[str, Any], wl: Workload) -> list[str]:
    ref = wl.reference
    head = ["forwarder"]
    for i, metric in enumerate(wl.metrics):
        head += [metric.label, f"×{ref}"] + (["×direct"] if i == 0 else [])
    lines = [f"### {wl.title}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for name, entry in summary["forwarders"].items():
        if entry["status"] != "ok":
            continue
        result = entry["results"][wl.key]
        if result["not_applicable"]:
            lines.append(f"| {name} | " + " | ".join(["n/a"] * (len(head) - 1)) + " |")
            continue
        row = [name]
        for i, metric in enumerate(wl.metrics):
            row += [_fmt(result["values"][metric.key]), _ratio(entry, ref, wl.key, metric.key)]
            if i == 0:
                row.append(_ratio(entry, "direct", wl.key, metric.key))
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _targets_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["### Targets", "", "| target | forwarder | workload | measured | needed | |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        value = row["measured"]
        shown = "–" if value is None else (f"{value:.2f}×" if row["reference"] else _fmt(value))
        lines.append(f"| {row['target']} | {row['forwarder']} | {row['workload']} | {shown} | "
                     f"{row['needed']} | {row['verdict']} |")
    return [*lines, ""]


def markdown(summary: dict[str, Any]) -> str:
    meta = summary["meta"]
    lines = ["# portproxy benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items()]
    lines += ["", "Forwarders:", ""]
    lines += [f"- {name}: {entry['label']}" for name, entry in summary["forwarders"].items()]
    lines += ["", "Medians over repeats; ×X is the ratio to peer X's median (for latency, CPU "
              "and memory lower is better; bytes per CPU-second is the inverse of CPU-s/GB). "
              "`–` means no figure.", ""]
    for wl in WORKLOADS:
        lines += _workload_table(summary, wl)
    lines += _targets_table(summary["targets"])
    notes = [f"- {name}: {entry['status']} — {entry['reason']}"
             for name, entry in summary["forwarders"].items() if entry["reason"]]
    errors = [f"- {name} / {wl}: {err}" for name, entry in summary["forwarders"].items()
              for wl, result in entry["results"].items() for err in result["errors"]]
    notes += [f"- {name} / {wl}: not applicable — {result['not_applicable']}"
              for name, entry in summary["forwarders"].items()
              for wl, result in entry["results"].items() if result["not_applicable"]]
    if notes:
        lines += ["### Not measured", "", *notes, ""]
    if errors:
        lines += ["### Errors", "", *errors, ""]
    return "\n".join(lines)


def write(summary: dict[str, Any], out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(summary)
    (out_dir / "latest.md").write_text(text)
    (out_dir / "latest.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return text
