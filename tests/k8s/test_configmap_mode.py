"""ConfigMap mode end to end: the real CLI, the real client, the fake API server."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess
from tests.k8s.conftest import ep, readyz, write_kubeconfig
from tests.k8s.fakeapi import FakeKube
from tests.net.harness import EchoServer, free_port, recv_all


def service(fake: FakeKube, name: str, backend: EchoServer) -> None:
    fake.service("web", name, [{"name": "tcp", "port": 80, "protocol": "TCP"}])
    fake.endpoint_slice("web", name, f"{name}-abc", [ep("127.0.0.1")],
                        [{"name": "tcp", "port": backend.port, "protocol": "TCP"}])


def exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def served(port: int, payload: bytes) -> bool:
    try:
        return exchange(port, payload) == payload
    except OSError:
        return False


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_configmap_entries_open_change_and_close_forwards(
        fake: FakeKube, tmp_path: Path, backends: tuple[EchoServer, EchoServer]) -> None:
    first, second = backends
    service(fake, "one", first)
    service(fake, "two", second)
    fake.configmap("ingress", "tcp-services", {})
    port = free_port()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
    proc = PortproxyProcess(["run", "--kubeconfig", str(kubeconfig), "--tcp-services-configmap",
                             "ingress/tcp-services", "--admin-address", "none",
                             "--drain-timeout", "30s"])
    try:
        proc.wait_for_line("tcp-services ingress/tcp-services: 0 entries")
        fake.configmap("ingress", "tcp-services", {str(port): "web/one:80"})  # key added
        # The port opens at once; connections are reset until the endpoints are known.
        wait_for(lambda: served(port, b"to one"), what="the port to open and serve")
        assert first.accepted >= 1

        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"held")
        assert held.recv(4, socket.MSG_WAITALL) == b"held"

        fake.configmap("ingress", "tcp-services", {str(port): "web/two:tcp"})  # changed
        proc.wait_for_line("tcp-services ingress/tcp-services: 1 entry", nth=2)

        def reaches_second() -> bool:
            return served(port, b"to two?") and second.accepted > 0
        wait_for(reaches_second, what="new connections to reach the new target")
        held.sendall(b"old connection untouched")
        assert held.recv(24, socket.MSG_WAITALL) == b"old connection untouched"

        fake.configmap("ingress", "tcp-services", {})  # key deleted
        wait_for(lambda: refused(port), what="the port to close")
        held.sendall(b"draining")
        assert held.recv(8, socket.MSG_WAITALL) == b"draining"
        held.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def serving_one(fake: FakeKube, tmp_path: Path, backends: tuple[EchoServer, EchoServer]
                ) -> tuple[PortproxyProcess, int]:
    """Services web/one and web/two on ``backends``; portproxy following a ConfigMap whose
    one entry forwards a port to web/one, and serving it."""
    service(fake, "one", backends[0])
    service(fake, "two", backends[1])
    port = free_port()
    fake.configmap("ingress", "tcp-services", {str(port): "web/one:80"})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
    proc = PortproxyProcess(["run", "--kubeconfig", str(kubeconfig), "--tcp-services-configmap",
                             "ingress/tcp-services", "--admin-address", "none"])
    try:
        wait_for(lambda: served(port, b"to one"), what="the first target to serve")
    except BaseException:
        proc.stop()
        raise
    return proc, port


def hand_over(fake: FakeKube, proc: PortproxyProcess, port: int,
              backends: tuple[EchoServer, EchoServer], change: Callable[[], None]) -> None:
    """Replace the forward on ``port`` (served by the first backend) by one to web/two
    (``change``) while the API hangs: the old forward must keep serving, then hand over."""
    first, second = backends
    fake.hang_requests(True)  # the new target's first list gets no answer for now
    try:
        change()
        proc.wait_for_line("reloaded: 0 unchanged, 1 added, 1 removed")
        before = first.accepted
        for i in range(5):  # refused here, before the hand-over existed
            assert exchange(port, b"still one %d" % i) == b"still one %d" % i
        assert first.accepted == before + 5 and second.accepted == 0
    finally:
        fake.hang_requests(False)
    wait_for(lambda: served(port, b"to two?") and second.accepted > 0,
             what="the new target to take over once resolved")
    proc.wait_for_line("accepting until its successor listens")


def test_a_changed_entry_keeps_serving_until_its_new_target_resolves(
        fake: FakeKube, tmp_path: Path, backends: tuple[EchoServer, EchoServer]) -> None:
    proc, port = serving_one(fake, tmp_path, backends)
    try:
        hand_over(fake, proc, port, backends, lambda: fake.configmap(
            "ingress", "tcp-services", {str(port): "web/two:tcp"}))
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def test_stopping_during_a_hand_over_drains_both_forwards(
        fake: FakeKube, tmp_path: Path, backends: tuple[EchoServer, EchoServer]) -> None:
    proc, port = serving_one(fake, tmp_path, backends)
    try:
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"held")
        assert held.recv(4, socket.MSG_WAITALL) == b"held"
        fake.hang_requests(True)  # the hand-over waits on this for good
        try:
            fake.configmap("ingress", "tcp-services", {str(port): "web/two:tcp"})
            proc.wait_for_line("accepting until its successor listens")
            proc.signal(signal.SIGTERM)
            proc.wait_for_line("draining 1 open connection(s)")
            wait_for(lambda: refused(port), what="both forwards to stop accepting")
            held.sendall(b"draining")  # the replaced forward's connection finishes
            assert held.recv(8, socket.MSG_WAITALL) == b"draining"
            held.close()
            assert proc.wait(20) == 0
        finally:
            fake.hang_requests(False)
    finally:
        proc.stop()


def test_decode_proxy_is_refused_with_a_reason(fake: FakeKube, tmp_path: Path) -> None:
    fake.configmap("ingress", "tcp-services", {"9100": "web/one:80:PROXY"})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
    proc = PortproxyProcess(["run", "--kubeconfig", str(kubeconfig), "--tcp-services-configmap",
                             "ingress/tcp-services", "--admin-address", "none"])
    try:
        proc.wait_for_line("decoding a PROXY header from clients is not supported")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def test_a_hand_over_follows_the_bound_address_not_the_spec_text(
        fake: FakeKube, tmp_path: Path, backends: tuple[EchoServer, EchoServer]) -> None:
    # lo/ipv4:PORT and 127.0.0.1:PORT are one address: the new forward is the old one's
    # successor, so the old keeps accepting until the new target has resolved.
    first, second = backends
    service(fake, "one", first)
    service(fake, "two", second)
    port = free_port()
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
    config = tmp_path / "portproxy.toml"
    config.write_text(f'admin-address = "none"\nkubeconfig = "{kubeconfig}"\n'
                      f'forwards = ["tcp://lo/ipv4:{port}=web/one:80"]\n')
    proc = PortproxyProcess(["run", "--config", str(config)])
    try:
        wait_for(lambda: served(port, b"to one"), what="the first target to serve")

        def change() -> None:
            config.write_text(f'admin-address = "none"\nkubeconfig = "{kubeconfig}"\n'
                              f'forwards = ["tcp://127.0.0.1:{port}=web/two:tcp"]\n')
            proc.signal(signal.SIGHUP)
        hand_over(fake, proc, port, backends, change)
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_not_ready_until_the_configmap_is_read(
        fake: FakeKube, tmp_path: Path, backends: tuple[EchoServer, EchoServer],
        extra: list[str]) -> None:
    # Before its first read a ConfigMap's entries are forwards still to come: an instance
    # serving none of them must not count as ready (a rollout would stop the old pod).
    service(fake, "one", backends[0])
    port, admin = free_port(), free_port()
    fake.configmap("ingress", "tcp-services", {str(port): "web/one:80"})
    ready = tmp_path / "ready"
    fake.hang_requests(True)
    proc = PortproxyProcess(["run", *extra, "--kubeconfig",
                             str(write_kubeconfig(tmp_path / "kubeconfig", fake.url)),
                             "--tcp-services-configmap", "ingress/tcp-services",
                             "--admin-address", f"127.0.0.1:{admin}",
                             "--ready-file", str(ready)])
    try:
        try:
            status, body = wait_for(lambda: (r := readyz(admin))[0] and r,
                                    what="the admin endpoint")
            assert (status, body) == (503, "tcp-services ingress/tcp-services: not read yet\n")
            assert not ready.exists()
        finally:
            fake.hang_requests(False)
        wait_for(lambda: readyz(admin)[0] == 200 and ready.exists(), timeout=20,
                 what="ready once the ConfigMap is read and its forward serves")
        assert served(port, b"entry")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_a_refused_reload_is_not_brought_back_by_the_next_configmap_change(
        fake: FakeKube, tmp_path: Path, backends: tuple[EchoServer, EchoServer],
        extra: list[str]) -> None:
    first, second = backends
    service(fake, "one", first)
    service(fake, "two", second)
    entry, held, later = free_port(), free_port(), free_port()
    fake.configmap("ingress", "tcp-services", {str(entry): "web/one:80"})
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", fake.url)
    config = tmp_path / "portproxy.toml"
    config.write_text(f'admin-address = "none"\nkubeconfig = "{kubeconfig}"\nforwards = []\n'
                      'tcp-services-configmap = "ingress/tcp-services"\n')
    proc = PortproxyProcess(["run", *extra, "--config", str(config)])
    holder = socket.socket()
    holder.bind(("127.0.0.1", held))  # another program's port: the reload will be refused
    holder.listen()
    try:
        wait_for(lambda: served(entry, b"entry"), what="the entry to serve")
        # The file now wants the entry's port for itself, and a port that is taken.
        config.write_text(f'admin-address = "none"\nkubeconfig = "{kubeconfig}"\n'
                          'tcp-services-configmap = "ingress/tcp-services"\nforwards = ['
                          f'"tcp://127.0.0.1:{entry}=web/two:80", '
                          f'"tcp://127.0.0.1:{held}=web/two:80"]\n')
        proc.signal(signal.SIGHUP)
        # With workers, each logs its own refusal first: only the supervisor's line says
        # that all of them refused (one that binds after the holder closes would apply it).
        proc.wait_for_line("reload refused by the workers" if extra
                           else "keeping the running configuration")
        holder.close()  # the port is free now, but the reload stays refused
        fake.configmap("ingress", "tcp-services", {str(entry): "web/one:80",
                                                   str(later): "web/one:80"})
        wait_for(lambda: served(later, b"later"), what="the new entry to serve")
        before = (first.accepted, second.accepted)
        assert exchange(entry, b"still one") == b"still one"
        assert (first.accepted, second.accepted) == (before[0] + 1, before[1])  # web/one
        assert refused(held)
    finally:
        holder.close()
        proc.stop()
