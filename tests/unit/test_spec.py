"""The forward spec parser: valid specs, invalid specs and their messages, fuzzing."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portproxy.endpoints import BalancePolicy
from portproxy.errors import ConfigError
from portproxy.spec import (
    ForwardOptions,
    HostTarget,
    ListenAddress,
    Protocol,
    ProxyProtocol,
    ServiceTarget,
    TargetMode,
    parse_forward,
)
from portproxy.spec_values import parse_duration

TCP, UDP = (Protocol.TCP,), (Protocol.UDP,)

VALID = [
    ("80=10.0.0.1:8080", TCP, ListenAddress("any", "", 80), HostTarget("10.0.0.1", 8080)),
    ("tcp://:80=web/frontend:http", TCP, ListenAddress("any", "", 80),
     ServiceTarget("web", "frontend", "http")),
    ("tcp+udp://:53=kube-system/kube-dns:dns", (Protocol.TCP, Protocol.UDP),
     ListenAddress("any", "", 53), ServiceTarget("kube-system", "kube-dns", "dns")),
    ("udp://0.0.0.0:5353=10.0.0.10:53", UDP, ListenAddress("ip", "0.0.0.0", 5353),
     HostTarget("10.0.0.10", 53)),
    ("*:1=db.internal:22", TCP, ListenAddress("any", "", 1), HostTarget("db.internal", 22)),
    ("[::1]:65535=[fd00::0:1]:443", TCP, ListenAddress("ip", "::1", 65535),
     HostTarget("fd00::1", 443)),
    ("eth0:80=ns/svc:8080", TCP, ListenAddress("interface", "eth0", 80),
     ServiceTarget("ns", "svc", 8080)),
    # A Service port name is a DNS label, up to 63 (15 is the limit of container ports).
    ("9100=logs/syslog:http-metrics-internal", TCP, ListenAddress("any", "", 9100),
     ServiceTarget("logs", "syslog", "http-metrics-internal")),
    ("UDP://eth0/ipv6:53=a.b:53", UDP, ListenAddress("interface", "eth0", 53, "ipv6"),
     HostTarget("a.b", 53)),
    ("tcp://127.0.0.1:2222=localhost:22", TCP, ListenAddress("ip", "127.0.0.1", 2222),
     HostTarget("localhost", 22)),
    # The same port on another address; beside a wildcard, a more specific listener (a
    # local DNS server) takes connections to its own address.
    ("127.0.0.2:80=127.0.0.1:80", TCP, ListenAddress("ip", "127.0.0.2", 80),
     HostTarget("127.0.0.1", 80)),
    ("udp://:53=127.0.0.53:53", UDP, ListenAddress("any", "", 53),
     HostTarget("127.0.0.53", 53)),
    ("[fe80::1%eth0]:80=[fe80::1%eth1]:80", TCP, ListenAddress("ip", "fe80::1%eth0", 80),
     HostTarget("fe80::1%eth1", 80)),
]


@pytest.mark.parametrize("text,protocols,listen,target", VALID)
def test_valid_specs(text: str, protocols: tuple[Protocol, ...], listen: ListenAddress,
                     target: object) -> None:
    forward = parse_forward(text)
    assert forward.protocols == protocols
    assert forward.listen == listen
    assert forward.target == target
    assert forward.options == ForwardOptions()


def test_every_option() -> None:
    forward = parse_forward(
        "tcp+udp://:80=web/frontend:http,mode=clusterip,balance=least-conn,connect-timeout=500ms,"
        "idle-timeout=5m,max-conns=100,max-flows=7,proxy-protocol=v2,"
        "allow=10.0.0.0/8;fd00::/8,fin-timeout=1h,name=web-80,responses=1"
    )
    assert forward.options == ForwardOptions(
        mode=TargetMode.CLUSTERIP, balance=BalancePolicy.LEAST_CONN, connect_timeout=0.5,
        idle_timeout=300.0, max_conns=100, max_flows=7, proxy_protocol=ProxyProtocol.V2,
        allow=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")),
        fin_timeout=3600.0, name="web-80", responses=1,
    )
    assert forward.name == "web-80"


def test_wait_interface_flag_and_defaults() -> None:
    forward = parse_forward("eth0:80=a:1,wait-interface")
    assert forward.options.wait_interface is True
    assert parse_forward("10.0.0.1:80=a:1,freebind").options.freebind is True
    base = ForwardOptions(connect_timeout=2.0)
    assert parse_forward("80=a:1", base).options.connect_timeout == 2.0
    assert parse_forward("80=a:1,connect-timeout=3", base).options.connect_timeout == 3.0


def test_derived_name_and_protocol_idle_defaults() -> None:
    forward = parse_forward("tcp+udp://127.0.0.1:53=x:53")
    assert forward.name == "tcp+udp/127.0.0.1:53"
    assert forward.options.idle_timeout_for(Protocol.TCP) == 3600.0
    assert forward.options.idle_timeout_for(Protocol.UDP) == 30.0


@pytest.mark.parametrize("text,seconds", [("500ms", 0.5), ("30s", 30), ("5m", 300),
                                          ("1h", 3600), ("2", 2), ("1.5", 1.5), ("0", 0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


INVALID = [
    ("tcp://:99999=x:1", "port 99999 is out of range 1-65535"),
    ("tcp://:0=x:1", "port 0 is out of range 1-65535"),
    ("sctp://:1=a:1", "protocol 'sctp' is not one of tcp, udp, tcp+udp"),
    ("80", "missing '='"),
    ("", "the spec is empty"),
    ("80=", "target is missing"),
    (":1=a", "target 'a' needs a port"),
    ("::1:80=a:1", "write IPv6 addresses in brackets, [::1]"),
    ("[::g]:80=a:1", "'::g' is not an IPv6 address"),
    ("300.1.1.1:80=a:1", "'300.1.1.1' is not an IPv4 address"),
    ("80=a:http", "target port 'http' is not a number"),
    ("80=ns/svc:BAD_NAME", "service port 'BAD_NAME' is neither a number nor a valid port name"),
    ("80=ns/svc:" + "a" * 64, "is neither a number nor a valid port name (lowercase letters, "
     "digits and '-', at most 63)"),
    ("80=Ns/svc:80", "namespace 'Ns' is not a valid Kubernetes namespace name"),
    # Its own listen address: each connection would open another through the proxy.
    ("127.0.0.1:8700=127.0.0.1:8700", "target 127.0.0.1:8700 is this forward's own listen"),
    ("udp://[::1]:53=[::1]:53", "target [::1]:53 is this forward's own listen address"),
    ("[::ffff:10.0.0.1]:80=10.0.0.1:80", "target 10.0.0.1:80 is this forward's own listen"),
    ("80=ns/1svc:80", "service name '1svc' is not a valid Kubernetes Service name"),
    ("80=a:1,foo=1", "unknown option 'foo'"),
    ("80=a:1,balance=fastest", "balance='fastest' is not one of round-robin"),
    ("80=a:1,mode=nodeport", "mode='nodeport' is not one of endpoints, clusterip"),
    ("80=a:1,proxy-protocol=v3", "proxy-protocol='v3' is not one of v1, v2"),
    ("80=a:1,idle-timeout=soon", "idle-timeout: invalid duration 'soon'"),
    ("80=a:1,connect-timeout=0", "connect-timeout must be greater than 0"),
    ("80=a:1,max-conns=-1", "max-conns='-1' is not a whole number"),
    ("80=a:1,responses=one", "responses='one' is not a whole number"),
    ("80=a:1,allow=10.0.0.0/33", "allow: '10.0.0.0/33' is not a CIDR"),
    ("80=a:1,name=a,name=b", "option 'name' is given twice"),
    ("80=a:1,balance", "option 'balance' needs a value"),
    ("udp://:53=a:53,proxy-protocol=v1", "proxy-protocol=v1 is TCP only"),
    ("udp://:53=a:53,max-conns=10", "option 'max-conns' is TCP only; this forward listens on UDP"),
    ("udp://:53=a:53,fin-timeout=1s", "option 'fin-timeout' is TCP only"),
    ("udp://:53=a:53,connect-timeout=1s", "option 'connect-timeout' is TCP only"),
    ("tcp://:80=a:1,max-flows=5", "option 'max-flows' is UDP only; this forward listens on TCP"),
    ("80=a:1,responses=1", "option 'responses' is UDP only"),
    ("80=10.0.0.1:1,mode=clusterip", "option 'mode' only applies to a Service target"),
    ("80=a:1,wait-interface", "wait-interface only applies to an interface"),
    ("80=a:1,freebind", "freebind only applies to an IP listen address"),
    ("10.0.0.1:80=a:1,freebind=maybe", "freebind='maybe': use true or false"),
    ("this-interface-name-is-too-long:80=a:1", "is neither an IP address nor an interface name"),
    ("eth0/ipv5:80=a:1", "the family after '/' must be ipv4 or ipv6"),
    ("80=bad_host!:1", "target host 'bad_host!' is not a valid IP address or DNS name"),
    ("80 =a:1", "the spec contains whitespace"),
    ("²=a:1", "port '²' is not a number"),
    ("80=a:١", "target port '١' is not a number"),
    ("80=a:1,max-flows=²", "max-flows='²' is not a whole number"),
    ("80=a:1,idle-timeout=١s", "idle-timeout: invalid duration '١s'"),
    ("[fe80::1]:80=a:1", "listen address 'fe80::1' is link-local: add its zone, "
     "[fe80::1%IFACE]"),
    ("80=[fe80::2]:80", "target 'fe80::2' is link-local: add its zone, [fe80::2%IFACE]"),
]


@pytest.mark.parametrize("text,message", INVALID)
def test_invalid_specs_name_the_offending_part(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_forward(text)
    assert str(info.value).startswith(f"invalid --forward {text!r}: ")
    assert message in str(info.value)


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.sampled_from([*"tcpud+:/[]*.,=;-_0123456789abfx ", "é", "²", "٣"]),
               max_size=60))
def test_random_strings_raise_only_config_error(text: str) -> None:
    try:
        parse_forward(text)
    except ConfigError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_unicode_raises_only_config_error(text: str) -> None:
    try:
        parse_forward(text)
    except ConfigError:
        pass


@given(st.integers(1, 65535), st.integers(1, 65535))
def test_ports_round_trip(listen: int, target: int) -> None:
    forward = parse_forward(f"{listen}=10.1.2.3:{target}")
    assert forward.listen.port == listen
    assert forward.target == HostTarget("10.1.2.3", target)


def test_an_ipv4_mapped_allow_entry_means_its_ipv4_network() -> None:
    """Clients of dual-stack sockets are compared unmapped (10.1.2.3, not ::ffff:10.1.2.3),
    so a mapped entry is read as the IPv4 network it denotes instead of matching nobody."""
    forward = parse_forward("80=a:1,allow=::ffff:10.0.0.0/104;::ffff:192.0.2.7;fd00::/8")
    assert forward.options.allow == (ipaddress.ip_network("10.0.0.0/8"),
                                     ipaddress.ip_network("192.0.2.7/32"),
                                     ipaddress.ip_network("fd00::/8"))


def test_global_switches_apply_where_they_can() -> None:
    defaults = ForwardOptions(wait_interface=True, freebind=True)
    on_interface = parse_forward("tcp://eth0:80=a:1", defaults).options
    on_ip = parse_forward("tcp://10.0.0.1:80=a:1", defaults).options
    on_all = parse_forward("80=a:1", defaults).options
    assert (on_interface.wait_interface, on_interface.freebind) == (True, False)
    assert (on_ip.wait_interface, on_ip.freebind) == (False, True)
    assert (on_all.wait_interface, on_all.freebind) == (False, False)
    with pytest.raises(ConfigError, match="freebind only applies to an IP listen address"):
        parse_forward("tcp://eth0:80=a:1,freebind", defaults)


def test_a_global_proxy_protocol_v1_applies_where_it_can() -> None:
    # `--proxy-protocol v1` beside a UDP forward is no error: UDP has no v1, so the UDP-only
    # forward goes without, and a tcp+udp forward keeps it for its TCP side.
    defaults = ForwardOptions(proxy_protocol=ProxyProtocol.V1)
    assert parse_forward("udp://:53=a:53", defaults).options.proxy_protocol is None
    assert parse_forward("tcp://:53=a:53", defaults).options.proxy_protocol is ProxyProtocol.V1
    both = parse_forward("tcp+udp://:53=a:53", defaults)
    assert both.options.proxy_protocol is ProxyProtocol.V1
    v2 = parse_forward("udp://:53=a:53,proxy-protocol=v2", defaults)
    assert v2.options.proxy_protocol is ProxyProtocol.V2
    with pytest.raises(ConfigError, match="proxy-protocol=v1 is TCP only"):
        parse_forward("tcp+udp://:53=a:53,proxy-protocol=v1", defaults)
