"""ingress-nginx tcp/udp-services ConfigMap entries as forwards (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portproxy.configmap import (
    ConfigMapRef,
    ForwardSources,
    configmap_forwards,
    entry_spec,
    parse_ref,
)
from portproxy.errors import ConfigError
from portproxy.spec import ForwardOptions, Protocol, ProxyProtocol, ServiceTarget, parse_forward

TCP = ConfigMapRef("ingress", "tcp-services", Protocol.TCP)
UDP = ConfigMapRef("ingress", "udp-services", Protocol.UDP)


@pytest.mark.parametrize("ref,port,value,spec", [
    (TCP, "9000", "default/example-go:8080",
     "tcp://:9000=default/example-go:8080,name=tcp-services/9000"),
    (TCP, "5432", "db/postgres:pg::PROXY",
     "tcp://:5432=db/postgres:pg,proxy-protocol=v1,name=tcp-services/5432"),
    (TCP, "22", "git/ssh:22::", "tcp://:22=git/ssh:22,name=tcp-services/22"),
    (UDP, "53", "kube-system/kube-dns:53", "udp://:53=kube-system/kube-dns:53,"
     "name=udp-services/53"),
])
def test_entries(ref: ConfigMapRef, port: str, value: str, spec: str) -> None:
    assert entry_spec(ref, port, value) == spec


@pytest.mark.parametrize("ref,port,value,message", [
    (TCP, "http", "a/b:80", "the key must be a port number"),
    (TCP, "80", "b:80", "is not NAMESPACE/NAME:PORT"),
    (TCP, "80", "a/b", "is not NAMESPACE/NAME:PORT"),
    (TCP, "80", "a/b:80:PROXY", "decoding a PROXY header from clients is not supported"),
    (TCP, "80", "a/b:80:SEND", "'SEND' is not PROXY or empty"),
    (UDP, "53", "a/b:53::PROXY", "which is TCP only"),
])
def test_invalid_entries_say_why(ref: ConfigMapRef, port: str, value: str,
                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        entry_spec(ref, port, value)


def test_invalid_entries_are_skipped_not_fatal() -> None:
    forwards, problems = configmap_forwards(
        TCP, {"9000": "default/a:80", "9001": "nope", "9002": "default/b:http::PROXY"},
        ForwardOptions())
    assert [f.listen.port for f in forwards] == [9000, 9002]
    assert forwards[1].target == ServiceTarget("default", "b", "http")
    assert forwards[1].options.proxy_protocol is ProxyProtocol.V1
    assert len(problems) == 1 and "9001" in problems[0]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=4))
def test_any_configmap_data_gives_forwards_or_problems(data: dict[str, str]) -> None:
    """A ConfigMap can hold anything: each entry becomes a forward or a problem line, and
    nothing else escapes (an exception here would end the daemon's watch task)."""
    forwards, problems = configmap_forwards(TCP, data, ForwardOptions())
    assert len(forwards) + len(problems) == len(data)


@pytest.mark.parametrize("port,value", [("²", "a/b:80"), ("80", "a/b:²"), ("٣", "a/b:http"),
                                        ("80", "a/b:١٢")])
def test_non_ascii_digits_are_problems(port: str, value: str) -> None:
    forwards, problems = configmap_forwards(TCP, {port: value}, ForwardOptions())
    assert forwards == [] and len(problems) == 1


def test_ports_of_static_forwards_are_not_taken_twice() -> None:
    sources = ForwardSources((parse_forward("tcp://:9000=x:1"),))
    forwards, _ = configmap_forwards(TCP, {"9000": "a/b:1", "9001": "a/c:1"}, ForwardOptions())
    problems = sources.set_dynamic(TCP, forwards)
    assert [f.listen.port for f in sources.dynamic[TCP]] == [9001]
    assert "port 9000 is already used" in problems[0]
    udp, _ = configmap_forwards(UDP, {"9000": "a/d:1"}, ForwardOptions())
    assert sources.set_dynamic(UDP, udp) == []  # UDP 9000 is free
    assert len(sources.desired()) == 3


def test_an_entry_named_like_a_static_forward_is_skipped() -> None:
    sources = ForwardSources((parse_forward("tcp://:9000=x:1,name=tcp-services/9001"),))
    forwards, _ = configmap_forwards(TCP, {"9001": "a/b:1", "9002": "a/c:1"}, ForwardOptions())
    problems = sources.set_dynamic(TCP, forwards)
    assert [f.listen.port for f in sources.dynamic[TCP]] == [9002]
    assert problems == ["tcp-services ingress/tcp-services key '9001': the forward name "
                        "'tcp-services/9001' is already used by another forward; entry skipped"]


def test_a_reload_checks_the_entries_against_the_new_static_forwards() -> None:
    sources = ForwardSources((parse_forward("tcp://:9000=x:1"),))
    forwards, _ = configmap_forwards(TCP, {"9001": "a/b:1", "9002": "a/c:1"}, ForwardOptions())
    assert sources.set_dynamic(TCP, forwards) == []
    problems = sources.set_static((parse_forward("tcp://:9000=x:1,name=tcp-services/9001"),
                                   parse_forward("tcp://:9002=x:2")))
    assert [f.listen.port for f in sources.dynamic[TCP]] == []
    assert len(problems) == 2
    assert "the forward name 'tcp-services/9001' is already used" in problems[0]
    assert "port 9002 is already used" in problems[1]
    # And back: the entries return once the static forwards leave them room.
    assert sources.set_static((parse_forward("tcp://:9000=x:1"),)) == []
    assert [f.listen.port for f in sources.dynamic[TCP]] == [9001, 9002]


def test_refs() -> None:
    assert parse_ref("ingress/tcp", Protocol.TCP, "--x") == ConfigMapRef("ingress", "tcp",
                                                                         Protocol.TCP)
    with pytest.raises(ConfigError, match="expected NAMESPACE/NAME"):
        parse_ref("tcp-services", Protocol.TCP, "--tcp-services-configmap")


@pytest.mark.parametrize(("text", "error"), [
    ("NS/tcp", "namespace 'NS' is not a valid Kubernetes namespace name"),
    ("ingress/Tcp_Services", "'Tcp_Services' is not a valid ConfigMap name"),
    ("ingress/" + "a" * 254, "is not a valid ConfigMap name"),
])
def test_refs_are_checked_as_the_api_would(text: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_ref(text, Protocol.UDP, "--udp-services-configmap")
    assert parse_ref("ingress-nginx/tcp.services-1", Protocol.TCP, "--x").name == \
        "tcp.services-1"
