"""--workers reloads: the workers bind, so the supervisor adopts a reload only once they
applied it. A refused one changes nothing, as without workers."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path

from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess
from tests.k8s.conftest import ep, readyz, write_kubeconfig
from tests.k8s.fakeapi import FakeKube
from tests.net.harness import EchoServer, free_port


def point_at(fake: FakeKube, backend: EchoServer) -> None:
    fake.endpoint_slice("web", "front", "front-abc", [ep("127.0.0.1")],
                        [{"name": "tcp", "port": backend.port, "protocol": "TCP"}])


def write_config(path: Path, admin: int, *specs: str) -> None:
    path.write_text(f'admin-address = "127.0.0.1:{admin}"\n'
                    f'forwards = [{", ".join(json.dumps(s) for s in specs)}]\n')


def served(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"ping")
        return client.recv(4, socket.MSG_WAITALL) == b"ping"


def switched(port: int, old: EchoServer) -> bool:
    """40 connections (the kernel spreads them over both workers) reach none of ``old``."""
    before = old.accepted
    return all(served(port) for _ in range(40)) and old.accepted == before


def metrics_text(admin: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(admin: int, series: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics_text(admin).splitlines()
               if line.startswith(series))


def forward_names(admin: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/forwards", timeout=5) as response:
        return sorted(f["name"] for f in json.load(response))


def test_a_reload_the_workers_refuse_leaves_the_running_configuration(
        fake: FakeKube, tmp_path: Path, backends: tuple[EchoServer, EchoServer]) -> None:
    first, second = backends
    fake.service("web", "front", [{"name": "tcp", "port": 80, "protocol": "TCP"}])
    point_at(fake, first)
    port, taken, admin = free_port(), free_port(), free_port()
    running = f"tcp://127.0.0.1:{port}=web/front:80"
    config = tmp_path / "c.toml"
    write_config(config, admin, running)
    blocker = socket.socket()  # holds `taken` without SO_REUSEPORT: no forward can bind it
    blocker.bind(("127.0.0.1", taken))
    blocker.listen()
    proc = PortproxyProcess(["run", "--workers", "2", "--config", str(config),
                             "--kubeconfig", str(write_kubeconfig(tmp_path / "kc", fake.url))])
    try:
        wait_for(lambda: readyz(admin)[0] == 200, what="ready")
        assert served(port)

        # The running forward changed (same name, a new forward) and one that cannot bind.
        write_config(config, admin, running + ",balance=random",
                     f"tcp://127.0.0.1:{taken}=web/front:80")
        proc.signal(signal.SIGHUP)
        line = proc.wait_for_line("reload refused by the workers")
        assert f"127.0.0.1:{taken}" in line, line
        assert readyz(admin)[0] == 200
        assert forward_names(admin) == [f"tcp/127.0.0.1:{port}"]
        # The refused forward was built far enough to have series: they are gone, also in
        # a worker's report from after the refusal (one that counts a later connection).
        ok = f'portproxy_connections_total{{forward="tcp/127.0.0.1:{port}",result="ok"}}'
        before = metric(admin, ok)
        assert served(port)
        wait_for(lambda: metric(admin, ok) > before, what="a report from after the refusal")
        assert f'forward="tcp/127.0.0.1:{taken}"' not in metrics_text(admin)

        # The running forward still follows its target in every worker.
        point_at(fake, second)
        wait_for(lambda: served(port) and second.accepted, what="a connection to the new "
                 "endpoint")
        wait_for(lambda: readyz(admin)[0] == 200 and switched(port, first),
                 what="every worker to use the new endpoint")

        write_config(config, admin, running + ",balance=random")  # now it can run
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("the workers run the new forwards")
        wait_for(lambda: readyz(admin)[0] == 200, what="ready after the reload")
        assert served(port)
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
        blocker.close()
