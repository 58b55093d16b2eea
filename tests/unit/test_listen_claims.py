"""Two forwards of one process on one address: refused, except across a hand-over."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator

import pytest

from portproxy.errors import SetupError
from portproxy.listen_claims import ListenClaims
from portproxy.sockets import BindRequest, bind_socket


class Owner:
    """Stands for an engine: claims are told apart by owner identity, not by name."""

    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture
def opened() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def binder(opened: list[socket.socket]):  # type: ignore[no-untyped-def]
    def bound(host: str, port: int = 0, kind: int = socket.SOCK_STREAM) -> socket.socket:
        sock = bind_socket(BindRequest(host, port, kind, listen=False), "test")
        opened.append(sock)
        return sock
    return bound


def test_a_second_forward_on_the_same_bound_address_is_refused(
        opened: list[socket.socket]) -> None:
    bound = binder(opened)
    claims = ListenClaims()
    a = bound("127.0.0.1")
    port = a.getsockname()[1]
    b = bound("127.0.0.1", port)  # SO_REUSEPORT: the kernel allows it
    claims.claim(a, Owner("tcp/lo:80"), "tcp/lo:80")
    with pytest.raises(SetupError) as raised:
        claims.claim(b, Owner("tcp/127.0.0.1:80"), "tcp/127.0.0.1:80")
    assert str(raised.value) == (
        f"forward tcp/127.0.0.1:80: tcp 127.0.0.1:{port} is already served by forward "
        "tcp/lo:80, and the kernel would split clients between the two; give them "
        "different addresses or ports")
    assert b.fileno() == -1  # closed: the port is not held by a refused forward


def test_a_dual_stack_wildcard_clashes_with_the_ipv4_wildcard(
        opened: list[socket.socket]) -> None:
    # The kernel would hand every IPv4 client to the 0.0.0.0 socket, none to the [::] one.
    bound = binder(opened)
    claims = ListenClaims()
    dual = bound("")
    port = dual.getsockname()[1]
    if dual.family != socket.AF_INET6:
        pytest.skip("no IPv6 here: '' binds 0.0.0.0 itself")
    claims.claim(dual, Owner("all"), "tcp/*:80")
    with pytest.raises(SetupError, match=re.escape(f"tcp 0.0.0.0:{port} is already served "
                                                   "by forward tcp/*:80")):
        claims.claim(bound("0.0.0.0", port), Owner("v4"), "tcp/0.0.0.0:80")


def test_other_protocol_address_or_port_is_no_clash(opened: list[socket.socket]) -> None:
    bound = binder(opened)
    first, second = Owner("a"), Owner("b")
    claims = ListenClaims()
    tcp = bound("127.0.0.1")
    port = tcp.getsockname()[1]
    claims.claim(tcp, first, "a")
    claims.claim(bound("127.0.0.1", port, socket.SOCK_DGRAM), second, "b")  # udp
    claims.claim(bound("0.0.0.0", port), second, "b")  # another address: the specific wins
    claims.claim(bound("127.0.0.1"), second, "b")  # another port


def test_retiring_owners_overlap_either_way_and_a_closed_socket_frees(
        opened: list[socket.socket]) -> None:
    bound = binder(opened)
    old, new, third = Owner("old"), Owner("new"), Owner("third")
    claims = ListenClaims()
    a = bound("127.0.0.1")
    port = a.getsockname()[1]
    claims.claim(a, old, "tcp/lo:80")
    claims.retiring.add(old)
    b = bound("127.0.0.1", port)
    claims.claim(b, new, "tcp/127.0.0.1:80")  # the hand-over overlap
    again = bound("127.0.0.1", port)
    claims.claim(again, old, "tcp/lo:80")  # the retiring one, again
    clash = re.escape("already served by forward tcp/127.0.0.1:80")
    with pytest.raises(SetupError, match=clash):
        claims.claim(bound("127.0.0.1", port), third, "c")  # the successor is live
    a.close()  # old's drain ends: its sockets close, and it is retired
    again.close()
    claims.retired(old)
    assert old not in claims.retiring
    b.close()
    claims.claim(bound("127.0.0.1", port), third, "c")  # every earlier socket is closed
    assert claims.sharing(third) == set()


def test_a_forward_reloaded_away_and_back_is_two_owners(opened: list[socket.socket]) -> None:
    # The old instance still drains while the same spec runs again: the new instance is
    # live, so a third forward on the address is refused (it would split it for good).
    bound = binder(opened)
    draining, again, clashing = Owner("A"), Owner("A"), Owner("C")
    claims = ListenClaims()
    a = bound("127.0.0.1")
    port = a.getsockname()[1]
    claims.claim(a, draining, "tcp/:80")
    claims.retiring.add(draining)
    claims.claim(bound("127.0.0.1", port), again, "tcp/:80")
    with pytest.raises(SetupError):
        claims.claim(bound("127.0.0.1", port), clashing, "tcp/[::]:80")


def test_sharing_finds_the_owners_on_any_common_address(opened: list[socket.socket]) -> None:
    bound = binder(opened)
    old, v4, other = Owner("old"), Owner("v4"), Owner("other")
    claims = ListenClaims()
    a = bound("127.0.0.1")
    port = a.getsockname()[1]
    b = bound("127.0.0.1", port)
    claims.claim(a, old, "old")
    claims.retiring.add(old)
    claims.claim(b, v4, "v4")
    claims.claim(bound("127.0.0.1"), other, "other")
    assert claims.sharing(old) == {v4}
    assert claims.sharing(v4) == {old}
    assert claims.sharing(other) == set()
    b.close()
    assert claims.sharing(old) == set()  # a closed socket shares nothing


def test_logs_tell_the_dual_stack_wildcard_from_the_ipv6_one(
        opened: list[socket.socket]) -> None:
    from portproxy.sockets import bound_address

    bound = binder(opened)
    dual, v6only, v4 = bound(""), bound("::"), bound("0.0.0.0")
    if dual.family != socket.AF_INET6:
        pytest.skip("no IPv6 here")
    assert bound_address(dual) == f"*:{dual.getsockname()[1]}"
    assert bound_address(v6only) == f"[::]:{v6only.getsockname()[1]}"
    assert bound_address(v4) == f"0.0.0.0:{v4.getsockname()[1]}"


def test_an_ipv4_mapped_address_is_its_ipv4_address(opened: list[socket.socket]) -> None:
    # The kernel gives the IPv4 socket every client: the mapped forward would get none.
    bound = binder(opened)
    claims = ListenClaims()
    v4 = bound("127.0.0.1")
    port = v4.getsockname()[1]
    claims.claim(v4, Owner("v4"), "tcp/127.0.0.1:80")
    with pytest.raises(SetupError, match=re.escape(f"tcp 127.0.0.1:{port} is already served")):
        claims.claim(bound("::ffff:127.0.0.1", port), Owner("mapped"), "mapped")
