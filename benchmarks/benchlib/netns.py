"""Running the whole benchmark inside a private network namespace.

Tens of thousands of short connections per second on the host's loopback fill the host's
conntrack table and TIME_WAIT buckets, which drops other processes' packets. Inside a
namespace of our own the only traffic is ours, and its sysctls can be tuned freely.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .settings import EPHEMERAL_RANGE, TW_BUCKETS

MARKER = "PORTPROXY_BENCH_IN_NETNS"
"""Set in the re-executed child, so it does not unshare again."""


def in_private_netns() -> bool:
    return os.environ.get(MARKER) == "1"


def reexec_in_netns(script: Path, argv: list[str]) -> int:
    """Run this script again under ``unshare --net``; return its exit code."""
    unshare = shutil.which("unshare")
    if unshare is None:
        print("unshare (util-linux) is needed to run in a private network namespace",
              file=sys.stderr)
        return 2
    env = dict(os.environ, **{MARKER: "1"})
    cmd = [unshare, "--net", "--", sys.executable, str(script), *argv]
    child = subprocess.Popen(cmd, env=env)

    def forward(signum: int, _frame: object) -> None:
        # The child cleans up on SIGTERM (see run.py): pass ours on instead of dying first.
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return child.wait()


def foreign_interfaces() -> list[str]:
    """Interfaces other than lo in the current network namespace.

    A namespace made for the benchmark has only lo. Any other interface means it is shared
    with something else (the host, a container), whose loopback and sysctls we must not tune.
    """
    return [name for _index, name in socket.if_nameindex() if name != "lo"]


def _sysctl(name: str, value: str) -> None:
    Path("/proc/sys", *name.split(".")).write_text(value + "\n")


def setup_namespace() -> None:
    """Bring up lo and bound TIME_WAIT in the (already private) namespace."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    # These are per network namespace, so the host's settings are left alone.
    _sysctl("net.ipv4.tcp_max_tw_buckets", str(TW_BUCKETS))
    _sysctl("net.ipv4.ip_local_port_range", f"{EPHEMERAL_RANGE[0]} {EPHEMERAL_RANGE[1]}")
    _sysctl("net.core.somaxconn", "4096")
