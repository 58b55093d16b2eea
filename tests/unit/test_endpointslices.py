"""EndpointSlice JSON → EndpointSet: the conditions, ports and address rules of the API."""

from __future__ import annotations

from typing import Any

import pytest

from portproxy.endpoints import Endpoint, EndpointSet
from portproxy.endpointslices import (
    describe_ports,
    endpoints_from_slices,
    service_port,
    slice_endpoints,
)


def ep(address: str, ready: bool | None = True, serving: bool | None = None,
       terminating: bool | None = None, node: str | None = None) -> dict[str, Any]:
    conditions: dict[str, Any] = {}
    for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating)):
        if value is not None:
            conditions[key] = value
    out: dict[str, Any] = {"addresses": [address], "conditions": conditions}
    if node:
        out["nodeName"] = node
    return out


def slice_(endpoints: list[dict[str, Any]] | None, ports: list[dict[str, Any]] | None = None,
           family: str = "IPv4", name: str = "s1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": family,
        "endpoints": endpoints,
        "ports": ports if ports is not None else [{"name": "http", "port": 8080,
                                                    "protocol": "TCP"}],
    }


def hosts(result: EndpointSet) -> list[str]:
    return [str(e) for e in result.endpoints]


def test_ready_endpoints_with_the_named_port() -> None:
    result = endpoints_from_slices([slice_([ep("10.0.0.2"), ep("10.0.0.1")])], "http")
    assert hosts(result) == ["10.0.0.1:8080", "10.0.0.2:8080"]


def test_nil_conditions_mean_ready() -> None:
    no_conditions = {"addresses": ["10.0.0.1"]}
    null_conditions = {"addresses": ["10.0.0.2"], "conditions": None}
    nil_ready = ep("10.0.0.3", ready=None)
    result = endpoints_from_slices([slice_([no_conditions, null_conditions, nil_ready])], "http")
    assert hosts(result) == ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]


def test_not_ready_endpoints_are_left_out_while_others_are_ready() -> None:
    endpoints = [
        ep("10.0.0.1"),
        ep("10.0.0.2", ready=False),
        ep("10.0.0.3", ready=False, serving=True, terminating=True),
    ]
    assert hosts(endpoints_from_slices([slice_(endpoints)], "http")) == ["10.0.0.1:8080"]


def test_serving_terminating_used_only_when_none_is_ready() -> None:
    endpoints = [
        ep("10.0.0.1", ready=False),  # starting: serving nil → true, but not terminating
        ep("10.0.0.2", ready=False, serving=True, terminating=True),
        ep("10.0.0.3", ready=False, serving=False, terminating=True),
        ep("10.0.0.4", ready=False, terminating=True),  # serving nil means true
    ]
    result = endpoints_from_slices([slice_(endpoints)], "http")
    assert hosts(result) == ["10.0.0.2:8080", "10.0.0.4:8080"]


def test_fallback_is_decided_across_all_slices() -> None:
    a = slice_([ep("10.0.0.1", ready=False, serving=True, terminating=True)], name="a")
    b = slice_([ep("10.0.0.2")], name="b")
    assert hosts(endpoints_from_slices([a, b], "http")) == ["10.0.0.2:8080"]


def test_endpoints_null_and_missing_are_empty() -> None:
    assert endpoints_from_slices([slice_(None)], "http") == EndpointSet()
    bare = {"addressType": "IPv4", "ports": [{"name": "http", "port": 1}]}
    assert endpoints_from_slices([bare], "http") == EndpointSet()
    assert endpoints_from_slices([], "http") == EndpointSet()


def test_multiple_slices_are_a_deduplicated_union() -> None:
    a = slice_([ep("10.0.0.1"), ep("10.0.0.2")], name="a")
    b = slice_([ep("10.0.0.2"), ep("10.0.0.3")], name="b")
    assert hosts(endpoints_from_slices([a, b], "http")) == [
        "10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]


def test_port_matched_by_name_gives_per_slice_target_ports() -> None:
    # Two pod templates expose the named container port "http" on different numbers.
    a = slice_([ep("10.0.0.1")], ports=[{"name": "http", "port": 8080},
                                         {"name": "metrics", "port": 9090}], name="a")
    b = slice_([ep("10.0.0.2")], ports=[{"name": "http", "port": 8081}], name="b")
    assert hosts(endpoints_from_slices([a, b], "http")) == ["10.0.0.1:8080", "10.0.0.2:8081"]
    assert hosts(endpoints_from_slices([a, b], "metrics")) == ["10.0.0.1:9090"]
    assert endpoints_from_slices([a, b], "grpc") == EndpointSet()


@pytest.mark.parametrize("name_field", [{"name": ""}, {"name": None}, {}])
def test_unnamed_port(name_field: dict[str, Any]) -> None:
    s = slice_([ep("10.0.0.1")], ports=[{"port": 80, **name_field}])
    assert hosts(endpoints_from_slices([s], "")) == ["10.0.0.1:80"]
    assert hosts(endpoints_from_slices([s], None)) == ["10.0.0.1:80"]
    assert endpoints_from_slices([s], "http") == EndpointSet()


def test_slice_without_port_number_or_ports_gives_nothing() -> None:
    assert endpoints_from_slices([slice_([ep("10.0.0.1")], ports=[{"name": "http"}])],
                                 "http") == EndpointSet()
    no_ports = slice_([ep("10.0.0.1")])
    no_ports["ports"] = None
    assert endpoints_from_slices([no_ports], "http") == EndpointSet()


def test_ipv6_slices_and_dual_stack_union() -> None:
    v4 = slice_([ep("10.0.0.1")], name="v4")
    v6 = slice_([ep("fd00::0:1"), ep("FD00::2")], family="IPv6", name="v6")
    result = endpoints_from_slices([v4, v6], "http")
    assert hosts(result) == ["10.0.0.1:8080", "[fd00::1]:8080", "[fd00::2]:8080"]
    assert {e.host for e in result.endpoints} == {"10.0.0.1", "fd00::1", "fd00::2"}


def test_fqdn_slices_and_invalid_addresses_are_ignored() -> None:
    fqdn = slice_([ep("db.example.com")], family="FQDN")
    junk = slice_([ep("not-an-ip"), {"addresses": []}, {"addresses": None}], name="junk")
    assert endpoints_from_slices([fqdn, junk], "http") == EndpointSet()


def test_only_the_first_address_of_an_endpoint_is_used() -> None:
    s = slice_([{"addresses": ["10.0.0.1", "10.0.0.9"]}])
    assert hosts(endpoints_from_slices([s], "http")) == ["10.0.0.1:8080"]


def test_node_name_is_carried() -> None:
    s = slice_([ep("10.0.0.1", node="node-a"), ep("10.0.0.2")])
    result = endpoints_from_slices([s], "http")
    assert [(e.host, e.node_name) for e in result.endpoints] == [
        ("10.0.0.1", "node-a"), ("10.0.0.2", None)]


def test_slice_endpoints_splits_ready_and_fallback() -> None:
    found = slice_endpoints(slice_([ep("10.0.0.1"), ep("10.0.0.2", ready=False,
                                                          terminating=True)]), "http")
    assert found.ready == (Endpoint("10.0.0.1", 8080),)
    assert found.serving_terminating == (Endpoint("10.0.0.2", 8080),)


SERVICE = {"spec": {"ports": [
    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353},
    {"name": "metrics", "port": 9153, "protocol": "TCP", "targetPort": "metrics"},
]}}


def port_name(service: dict[str, Any], port: int | str, protocol: str = "TCP") -> str | None:
    entry = service_port(service, port, protocol)
    return None if entry is None else str(entry.get("name") or "")


def test_service_port_by_number_name_and_protocol() -> None:
    assert port_name(SERVICE, "dns-tcp") == "dns-tcp"
    assert port_name(SERVICE, 53) == "dns-tcp"  # the TCP one of two sharing the number
    assert port_name(SERVICE, 53, "UDP") == "dns"
    # A name stands for its number: the Service's port 53 over the other protocol.
    assert port_name(SERVICE, "dns") == "dns-tcp"
    assert port_name(SERVICE, "dns-tcp", "UDP") == "dns"
    assert port_name(SERVICE, 9153) == "metrics"
    assert port_name(SERVICE, 9153, "UDP") is None  # kube-proxy has no UDP rule for it
    assert port_name(SERVICE, "metrics", "UDP") is None
    assert port_name(SERVICE, 5353) is None  # a targetPort is not a service port
    assert port_name(SERVICE, "http") is None
    assert port_name({"spec": {"ports": [{"port": 80}]}}, 80) == ""  # protocol absent: TCP
    assert port_name({"spec": {"ports": [{"port": 80}]}}, 80, "UDP") is None
    assert port_name({"spec": {}}, 80) is None
    assert port_name({"spec": {"ports": [{"name": "x"}]}}, "x") is None  # no number


def test_slices_are_read_for_the_ports_protocol() -> None:
    # syslog: 514/UDP and 514/TCP lead to different pod ports.
    s = slice_([ep("10.0.0.1")], ports=[{"name": "udp", "port": 5514, "protocol": "UDP"},
                                        {"name": "tcp", "port": 6514, "protocol": "TCP"},
                                        {"name": "both", "port": 7514, "protocol": "UDP"},
                                        {"name": "both", "port": 8514}])
    assert hosts(endpoints_from_slices([s], "udp", "UDP")) == ["10.0.0.1:5514"]
    assert endpoints_from_slices([s], "udp", "TCP") == EndpointSet()
    assert hosts(endpoints_from_slices([s], "tcp")) == ["10.0.0.1:6514"]
    assert hosts(endpoints_from_slices([s], "both", "UDP")) == ["10.0.0.1:7514"]
    assert hosts(endpoints_from_slices([s], "both", "TCP")) == ["10.0.0.1:8514"]


def test_port_description() -> None:
    assert describe_ports(SERVICE) == "dns=53/UDP, dns-tcp=53, metrics=9153"
    assert describe_ports({"spec": {"ports": [{"port": 80}]}}) == "80"
    assert describe_ports({}) == "none"
