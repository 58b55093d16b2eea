"""A DNS lookup that never ends must not hold the process up after SIGTERM.

The namespace gets its own resolv.conf (``ip netns exec`` bind-mounts
/etc/netns/NAME/resolv.conf), naming a nameserver inside it that reads queries and never
answers.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.netns import nsutil

SILENT_NAMESERVER = """
import signal, socket
server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
server.bind(("127.0.0.1", 53))
tcp = socket.socket()
tcp.bind(("127.0.0.1", 53))
tcp.listen()
print("listening", flush=True)
signal.pause()  # queries pile up unanswered
"""


@pytest.fixture
def silent_dns(netns: nsutil.NetNamespace) -> Iterator[nsutil.NetNamespace]:
    directory = Path("/etc/netns") / netns.name
    directory.mkdir(parents=True)
    try:
        # Each try waits the full timeout: a lookup lasts about 2 x 5 s before it fails.
        (directory / "resolv.conf").write_text(
            "nameserver 127.0.0.1\noptions timeout:5 attempts:2\n")
        nameserver = netns.popen_python(SILENT_NAMESERVER)
        nameserver.expect_line(lambda line: line == "listening")
        yield netns
    finally:
        shutil.rmtree(directory)


def test_sigterm_during_a_lookup_that_never_ends_exits_within_the_drain(
        silent_dns: nsutil.NetNamespace) -> None:
    proxy = silent_dns.portproxy("run", "-f", "tcp://127.0.0.1:8080=backend.invalid.test:80",
                                 "--admin-address", "none", "--drain-timeout", "1s")
    wait_for(lambda: "bound tcp 127.0.0.1:8080" in proxy.stderr_text(), what="the bind")
    proxy.proc.send_signal(signal.SIGTERM)
    try:
        # The lookup in flight has some 9 s to go: the exit must not wait for it.
        assert proxy.proc.wait(timeout=5) == 0, proxy.stderr_text()
    except subprocess.TimeoutExpired:
        raise AssertionError("still running 5 s after SIGTERM with a 1 s drain") from None

