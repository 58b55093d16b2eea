"""Two forwards of one process on one address: refused, except across a hand-over."""

from __future__ import annotations

import re
import socket

import pytest

from portproxy.errors import SetupError
from portproxy.listen_claims import ListenClaims
from portproxy.sockets import BindRequest, bind_socket
from portproxy.spec import parse_forward


def bound(host: str, port: int = 0, kind: int = socket.SOCK_STREAM) -> socket.socket:
    return bind_socket(BindRequest(host, port, kind, listen=False), "test")


def test_a_second_forward_on_the_same_bound_address_is_refused() -> None:
    first = parse_forward("tcp://lo:80=a:1")
    second = parse_forward("tcp://127.0.0.1:80=b:1")
    claims = ListenClaims()
    a = bound("127.0.0.1")
    port = a.getsockname()[1]
    b = bound("127.0.0.1", port)  # SO_REUSEPORT: the kernel allows it
    try:
        claims.claim(a, first)
        with pytest.raises(SetupError) as raised:
            claims.claim(b, second)
        assert str(raised.value) == (
            f"forward tcp/127.0.0.1:80: tcp 127.0.0.1:{port} is already served by forward "
            "tcp/lo:80, and the kernel would split clients between the two; give them "
            "different addresses or ports")
        assert b.fileno() == -1  # closed: the port is not held by a refused forward
    finally:
        a.close()
        b.close()


def test_other_protocol_family_or_port_is_no_clash() -> None:
    forward_a, forward_b = parse_forward("tcp+udp://:80=a:1"), parse_forward("80=b:1")
    claims = ListenClaims()
    tcp = bound("127.0.0.1")
    port = tcp.getsockname()[1]
    sockets = [tcp, bound("127.0.0.1", port, socket.SOCK_DGRAM), bound("0.0.0.0", port),
               bound("127.0.0.1")]
    try:
        claims.claim(sockets[0], forward_a)
        claims.claim(sockets[1], forward_b)  # udp
        claims.claim(sockets[2], forward_b)  # another address (the more specific one wins)
        claims.claim(sockets[3], forward_b)  # another port
    finally:
        for sock in sockets:
            sock.close()


def test_a_retiring_forward_lets_its_successor_bind_and_a_closed_socket_frees() -> None:
    old, new, third = (parse_forward(spec) for spec in
                       ("tcp://lo:80=a:1", "tcp://127.0.0.1:80=b:1", "tcp://127.0.0.1:80=c:1"))
    claims = ListenClaims()
    a = bound("127.0.0.1")
    port = a.getsockname()[1]
    b, c = bound("127.0.0.1", port), bound("127.0.0.1", port)
    try:
        claims.claim(a, old)
        claims.retiring.add(old)
        claims.claim(b, new)  # the hand-over overlap
        clash = re.escape("already served by forward tcp/127.0.0.1:80")
        with pytest.raises(SetupError, match=clash):
            claims.claim(c, third)  # the successor is live: no second overlap
        a.close()
        claims.retired(old)
        assert old not in claims.retiring
        b.close()
        d = bound("127.0.0.1", port)
        claims.claim(d, third)  # both earlier sockets closed: nothing to clash with
        d.close()
    finally:
        for sock in (a, b, c):
            sock.close()


def test_sharing_finds_the_forwards_on_any_common_address() -> None:
    old, v4, other = (parse_forward(spec) for spec in
                      ("tcp://lo:80=a:1", "tcp://127.0.0.1:80=b:1", "tcp://127.0.0.1:81=c:1"))
    claims = ListenClaims()
    a = bound("127.0.0.1")
    port = a.getsockname()[1]
    b, c = bound("127.0.0.1", port), bound("127.0.0.1")
    try:
        claims.claim(a, old)
        claims.retiring.add(old)
        claims.claim(b, v4)
        claims.claim(c, other)
        assert claims.sharing(old) == {v4}
        assert claims.sharing(v4) == {old}
        assert claims.sharing(other) == set()
        b.close()
        assert claims.sharing(old) == set()  # a closed socket shares nothing
    finally:
        for sock in (a, b, c):
            sock.close()
