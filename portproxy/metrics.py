"""Counters, gauges and histograms with the Prometheus text exposition (format 0.0.4).

Deliberately tiny: the data path holds a reference to a labelled child and does
``child.value += n`` — no locks (one event loop per process), no label lookups per packet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from portproxy import __version__


@dataclass(slots=True)
class Counter:
    value: float = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


@dataclass(slots=True)
class Gauge:
    value: float = 0.0
    function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self.value = value

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set_function(self, function: Callable[[], float]) -> None:
        """Read the value from ``function`` at scrape time (e.g. a table's length)."""
        self.function = function

    def read(self) -> float:
        return self.function() if self.function is not None else self.value


@dataclass(slots=True)
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break


Child = TypeVar("Child", Counter, Gauge, Histogram)


class Family(Generic[Child]):
    """One metric name with its label names; children are created on first use."""

    def __init__(
        self, name: str, help_text: str, kind: str, labelnames: tuple[str, ...],
        factory: Callable[[], Child],
    ) -> None:
        self.name = name
        self.help_text = help_text
        self.kind = kind
        self.labelnames = labelnames
        self._factory: Callable[[], Child] = factory
        self._children: dict[tuple[str, ...], Child] = {}

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._children[values] = self._factory()
        return child

    def remove_matching(self, label: str, value: str) -> None:
        """Drop every child whose ``label`` equals ``value`` (a forward that was removed)."""
        index = self.labelnames.index(label)
        for key in [k for k in self._children if k[index] == value]:
            del self._children[key]

    def children(self) -> Iterator[tuple[tuple[str, ...], Child]]:
        return iter(sorted(self._children.items()))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


class Registry:
    """All metric families of one process, rendered in registration order."""

    def __init__(self) -> None:
        self._families: list[Family[Counter] | Family[Gauge] | Family[Histogram]] = []

    def counter(self, name: str, help_text: str, labelnames: tuple[str, ...]) -> Family[Counter]:
        family = Family(name, help_text, "counter", labelnames, Counter)
        self._families.append(family)
        return family

    def gauge(self, name: str, help_text: str, labelnames: tuple[str, ...]) -> Family[Gauge]:
        family = Family(name, help_text, "gauge", labelnames, Gauge)
        self._families.append(family)
        return family

    def histogram(
        self, name: str, help_text: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Family[Histogram]:
        family = Family(name, help_text, "histogram", labelnames, lambda: Histogram(buckets))
        self._families.append(family)
        return family

    def snapshot(self) -> list[tuple[str, tuple[str, ...], object]]:
        """Every child's value as plain data (to send from a worker to its supervisor)."""
        rows: list[tuple[str, tuple[str, ...], object]] = []
        for family in self._families:
            for values, child in family.children():
                if isinstance(child, Histogram):
                    rows.append((family.name, values, (list(child.counts), child.total,
                                                       child.count)))
                elif isinstance(child, Gauge):
                    rows.append((family.name, values, child.read()))
                else:
                    rows.append((family.name, values, child.value))
        return rows

    def add_snapshot(self, rows: list[tuple[str, tuple[str, ...], object]],
                     gauges: bool = True, skip: tuple[str, ...] = ()) -> None:
        """Add another registry's snapshot to this one's values (summing workers)."""
        families = {family.name: family for family in self._families}
        for name, values, value in rows:
            family = families.get(name)
            if family is None or name in skip or (family.kind == "gauge" and not gauges):
                continue
            child = family.labels(*values)
            if isinstance(child, Histogram):
                assert isinstance(value, tuple)
                counts: list[int] = value[0]
                child.counts = [a + b for a, b in zip(child.counts, counts, strict=True)]
                child.total += float(value[1])
                child.count += int(value[2])
            elif isinstance(child, Gauge):
                child.value = child.read() + float(value)  # type: ignore[arg-type]
                child.function = None
            else:
                child.value += float(value)  # type: ignore[arg-type]

    def label_values(self, label: str) -> set[str]:
        """Every value ``label`` has in some series."""
        found: set[str] = set()
        for family in self._families:
            if label in family.labelnames:
                index = family.labelnames.index(label)
                found.update(values[index] for values, _ in family.children())
        return found

    def forget(self, label: str, value: str) -> None:
        for family in self._families:
            if label in family.labelnames:
                family.remove_matching(label, value)

    def render(self) -> str:
        lines: list[str] = []
        for family in self._families:
            lines.append(f"# HELP {family.name} {family.help_text}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for values, child in family.children():
                lines.extend(_render_child(family.name, family.labelnames, values, child))
        return "\n".join(lines) + "\n"


def _render_child(
    name: str, labelnames: tuple[str, ...], values: tuple[str, ...],
    child: Counter | Gauge | Histogram,
) -> list[str]:
    if isinstance(child, Counter):
        return [f"{name}{_labels(labelnames, values)} {_number(child.value)}"]
    if isinstance(child, Gauge):
        return [f"{name}{_labels(labelnames, values)} {_number(child.read())}"]
    lines = []
    cumulative = 0
    for bound, count in zip(child.buckets, child.counts, strict=True):
        cumulative += count
        le = f'le="{_number(bound)}"'
        lines.append(f"{name}_bucket{_labels(labelnames, values, le)} {cumulative}")
    inf = 'le="+Inf"'
    lines.append(f"{name}_bucket{_labels(labelnames, values, inf)} {child.count}")
    lines.append(f"{name}_sum{_labels(labelnames, values)} {_number(child.total)}")
    lines.append(f"{name}_count{_labels(labelnames, values)} {child.count}")
    return lines


CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ProxyMetrics:
    """The metric families of DESIGN §1, declared once per process."""

    def __init__(self, registry: Registry | None = None) -> None:
        r = self.registry = registry or Registry()
        self.build_info = r.gauge(
            "portproxy_build_info", "Version and data pump in use.", ("version", "pump"))
        self.connections = r.counter(
            "portproxy_connections_total",
            "TCP connections accepted, by outcome (ok, refused, timeout, denied, no_endpoints, "
            "limit, aborted).", ("forward", "result"))
        self.closed = r.counter(
            "portproxy_connections_closed_total",
            "TCP connections ended, by how: ok (both sides finished), reset (an error), "
            "idle_timeout, fin_timeout, drain_timeout.", ("forward", "reason"))
        self.active = r.gauge(
            "portproxy_active_connections",
            "TCP clients open now, those still connecting to a backend included.", ("forward",))
        self.bytes = r.counter(
            "portproxy_bytes_total",
            "Bytes relayed; upstream is client to backend.", ("forward", "direction"))
        self.udp_flows = r.gauge(
            "portproxy_udp_flows_active", "UDP flows open now.", ("forward",))
        self.udp_datagrams = r.counter(
            "portproxy_udp_datagrams_total", "UDP datagrams relayed.", ("forward", "direction"))
        self.udp_dropped = r.counter(
            "portproxy_udp_dropped_total",
            "UDP datagrams dropped, by reason (denied, no_endpoints, draining, refused, "
            "overload, too_big, error; evicted counts flows).",
            ("forward", "reason"))
        self.endpoints = r.gauge(
            "portproxy_endpoints", "Ready endpoints known.", ("forward",))
        self.connect_seconds = r.histogram(
            "portproxy_upstream_connect_seconds", "Time to connect to a backend.",
            ("forward",), CONNECT_BUCKETS)
        self.accept_errors = r.counter(
            "portproxy_accept_errors_total",
            "accept() failures such as EMFILE, after which accepting backs off.", ("forward",))
        self.kube_watch_restarts = r.counter(
            "portproxy_kube_watch_restarts_total",
            "Kubernetes watch restarts, by watched object (a Service's own watch and its "
            "EndpointSlice watch each count; a followed ConfigMap under its name).",
            ("service",))

    def set_build(self, pump: str) -> None:
        self.build_info.labels(__version__, pump).set(1)
