"""Reading the addresses sockets listen on from /proc/net (the parser, then the kernel)."""

from __future__ import annotations

import ipaddress
import socket

from portproxy.ifbind import in_use
from portproxy.proc_net import listening, read_listening

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0A14FEA9:0035 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1
"""
UDP6_TABLE = """\
  sl  local_address                         remote_address                        st tx_queue
   0: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 07 00000000
   1: 0000000000000000FFFF00000A14FEA9:0035 00000000000000000000000000000000:0000 07 00000000
"""


def test_listening_rows_only_in_canonical_form() -> None:
    # 169.254.20.10 is stored as 0A14FEA9 (the word in little-endian order); the row in
    # state 01 (established) is no listener.
    assert listening(TCP_TABLE.splitlines(), "0A") == {("127.0.0.1", 8080),
                                                       ("169.254.20.10", 53)}
    assert listening(UDP6_TABLE.splitlines(), "07") == {
        ("::1", 53), (str(ipaddress.ip_address("::ffff:169.254.20.10")), 53)}


def test_the_kernel_tables_show_our_own_listeners() -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.2", 0))
        tcp_port = tcp.getsockname()[1]
        assert ("127.0.0.2", tcp_port) not in read_listening()  # bound, not yet listening
        tcp.listen()
        udp.bind(("::1", 0))
        found = read_listening()
        assert {("127.0.0.2", tcp_port), ("::1", udp.getsockname()[1])} <= found


def test_a_link_is_in_use_by_a_listener_on_its_addresses_or_a_wildcard_on_our_ports() -> None:
    listeners = {("0.0.0.0", 22), ("169.254.20.11", 53), ("0.0.0.0", 5353), ("10.0.0.1", 80)}
    # Its own VIP, or any address the link has now (a rollout that changed the VIP).
    assert in_use({"169.254.20.10", "169.254.20.11"}, set(), listeners) == ["169.254.20.11:53"]
    # A wildcard on a port of this instance's forwards: the next pod, listening everywhere.
    assert in_use({"169.254.20.10"}, {5353}, listeners) == ["0.0.0.0:5353"]
    # sshd on 0.0.0.0:22 and a listener elsewhere are not users of the link.
    assert in_use({"169.254.20.10"}, {53}, listeners) == []
