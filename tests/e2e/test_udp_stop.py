"""SIGTERM with UDP flows: the listening socket stays open for their replies, and beside a
new instance (SO_REUSEPORT) the kernel keeps hashing part of the new clients to it."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cli import PortproxyProcess
from tests.e2e.test_udp_reload import ANSWER_TIMEOUT, ask, configure, started, tagged
from tests.net.harness import free_port
from tests.net.udp_harness import UdpBackend, client


def test_a_stopping_instance_serves_new_clients_until_its_socket_closes(tmp_path: Path) -> None:
    # They used to be dropped (reason="draining") for as long as any flow kept the socket
    # open, up to the drain timeout, and so were their retries from the same port.
    port = free_port(kind=socket.SOCK_DGRAM)
    config = tmp_path / "c.toml"
    with UdpBackend(handler=tagged(b"r:")) as backend, client() as kept, client() as fresh:
        configure(config, port, backend)
        proc = PortproxyProcess(["run", "--config", str(config)])
        try:
            started(proc, port)
            assert ask(kept, port, b"before") == b"r:before"
            proc.signal(signal.SIGTERM)
            proc.wait_for_line("draining 0 open connection(s) and 1 UDP flow(s)")
            assert ask(kept, port, b"during") == b"r:during"  # the flow is not quiet
            fresh.settimeout(ANSWER_TIMEOUT)
            assert ask(fresh, port, b"new") == b"r:new"
            assert proc.wait(20) == 0  # once both flows have been quiet for 2 s
        finally:
            proc.stop()


def test_new_clients_are_served_only_while_the_flows_of_the_stop_last(tmp_path: Path) -> None:
    # Serving every new client kept the table from ever emptying: with clients arriving
    # steadily, even a lone instance (docker stop) served them until the drain timeout,
    # then cut them off. Once the flows it had at the stop have ended, it turns new ones
    # away, ends those it let in 2 s later however busy (one client here never pauses),
    # its socket closes, and it exits.
    port = free_port(kind=socket.SOCK_DGRAM)
    config = tmp_path / "c.toml"
    stop_sending = threading.Event()
    with UdpBackend(handler=tagged(b"r:")) as backend, client() as kept:
        configure(config, port, backend)
        config.write_text(config.read_text().replace('"20s"', '"60s"'))  # drain timeout
        proc = PortproxyProcess(["run", "--config", str(config), "--access-log"])

        def newcomers() -> None:  # every 0.1 s while the process lives: a new client
            with client() as busy:  # port, and one more datagram from a busy client
                for i in range(600):
                    if stop_sending.wait(0.1):
                        return
                    busy.sendto(b"busy %d" % i, ("127.0.0.1", port))
                    with client() as sock:
                        sock.sendto(b"%d" % i, ("127.0.0.1", port))
        sender = threading.Thread(target=newcomers)
        try:
            started(proc, port)
            assert ask(kept, port, b"before") == b"r:before"
            proc.signal(signal.SIGTERM)
            proc.wait_for_line("draining 0 open connection(s) and 1 UDP flow(s)")
            sender.start()
            assert proc.wait(30) == 0  # not the 60 s drain timeout
            assert "result=drain_timeout" not in proc.output
        finally:
            stop_sending.set()
            if sender.is_alive():
                sender.join(10)
            proc.stop()


@contextlib.contextmanager
def replaced(tmp_path: Path, port: int
             ) -> Iterator[tuple[PortproxyProcess, Path, UdpBackend, threading.Event]]:
    """A UDP forward to a backend answering "1:", with a flow, replaced by a reload with
    one to a backend answering "2:": (the process, its config file, the second backend,
    an event that ends the flow's traffic) while the replaced forward drains that flow.

    The flow is kept busy by its backend, a reply every 0.1 s: after the reload the kernel
    hashes its client to either socket, so the client's own datagrams might never reach
    the replaced forward again."""
    config = tmp_path / "c.toml"
    quiet = threading.Event()
    tickers: list[threading.Thread] = []

    def first_answers(data: bytes, source: tuple[str, int]) -> list[bytes]:
        if data == b"before":
            def tick() -> None:
                for _ in range(300):
                    if quiet.wait(0.1):
                        return
                    first.sock.sendto(b"tick", source)
            tickers.append(threading.Thread(target=tick))
            tickers[-1].start()
        return [b"1:" + data]

    with UdpBackend(handler=first_answers) as first, UdpBackend(handler=tagged(b"2:")) \
            as second, client() as kept:
        configure(config, port, first)
        proc = PortproxyProcess(["run", "--config", str(config)])
        try:
            started(proc, port)
            assert ask(kept, port, b"before") == b"1:before"
            configure(config, port, second)
            proc.signal(signal.SIGHUP)
            proc.wait_for_line("removed: draining")
            yield proc, config, second, quiet
        finally:
            quiet.set()
            for ticker in tickers:
                ticker.join(10)
            proc.stop()


def test_a_forward_replaced_by_a_reload_serves_new_clients_when_stopping(
        tmp_path: Path) -> None:
    # Its successor, with no flow, closes its socket at the stop, so every new client then
    # reaches the replaced forward's, still open for its flow; handing them over to the
    # closed successor failed, and they were all dropped.
    port = free_port(kind=socket.SOCK_DGRAM)
    with replaced(tmp_path, port) as (proc, _config, _second, quiet), client() as fresh:
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("draining 0 open connection(s) and 1 UDP flow(s)")
        fresh.settimeout(ANSWER_TIMEOUT)
        assert ask(fresh, port, b"new") == b"1:new"
        quiet.set()
        assert proc.wait(20) == 0


def test_a_replaced_forward_whose_successor_was_removed_turns_new_clients_away(
        tmp_path: Path) -> None:
    # A second reload removed the successor: the address is no longer configured, so at
    # the stop the replaced forward, still draining its flow, must not take new clients
    # (it did, while its list of successors still named the removed forward).
    port, other = free_port(kind=socket.SOCK_DGRAM), free_port(kind=socket.SOCK_DGRAM)
    with replaced(tmp_path, port) as (proc, config, second, quiet), client() as fresh:
        configure(config, other, second)  # the successor removed
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("removed: draining", nth=2)
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("draining 0 open connection(s) and 1 UDP flow(s)")
        fresh.settimeout(ANSWER_TIMEOUT)
        fresh.sendto(b"new", ("127.0.0.1", port))
        with pytest.raises(TimeoutError):
            fresh.recv(100)
        quiet.set()
        assert proc.wait(20) == 0
