"""Reading the addresses sockets listen on from /proc/net (the parser, then the kernel)."""

from __future__ import annotations

import ipaddress
import socket

from portproxy.proc_net import listening_hosts, read_listening_hosts

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
    assert listening_hosts(TCP_TABLE.splitlines(), "0A") == {"127.0.0.1", "169.254.20.10"}
    assert listening_hosts(UDP6_TABLE.splitlines(), "07") == {
        "::1", str(ipaddress.ip_address("::ffff:169.254.20.10"))}


def test_the_kernel_tables_show_our_own_listeners() -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.2", 0))
        assert "127.0.0.2" not in read_listening_hosts()  # bound, not yet listening
        tcp.listen()
        udp.bind(("::1", 0))
        hosts = read_listening_hosts()
    assert {"127.0.0.2", "::1"} <= hosts
