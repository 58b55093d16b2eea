"""Zero-downtime hand-over on a node: a new instance binds beside the old one
(SO_REUSEPORT), the old one drains, and no connection fails nor loses a byte.

This is a DaemonSet rolling out with maxSurge 1 / maxUnavailable 0 on one node: both pods
share the host port for a while. The node allows net.ipv4.tcp_migrate_req=1 (set here in
the test's own namespace), so handshakes still queued on the old listener when it closes
move to the new one instead of being reset.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from tests.netns import nsutil
from tests.netns.test_interface_listen import BACKEND_PORT, start_backend

LOAD = Path(__file__).with_name("rollout_load.py")


def test_rolling_restart_loses_nothing(netns: nsutil.NetNamespace) -> None:
    netns.run(["sysctl", "-q", "-w", "net.ipv4.tcp_migrate_req=1"])
    start_backend(netns)
    spec = f"tcp://127.0.0.1:8080=127.0.0.1:{BACKEND_PORT}"
    old = netns.portproxy("run", "-f", spec, "--admin-address", "none",
                          "--drain-timeout", "60s")
    netns.wait_tcp("127.0.0.1", 8080)
    load = netns.popen([sys.executable, str(LOAD), "8080", "60"])
    load.expect_line(lambda line: line == "started", timeout=30)

    new = netns.portproxy("run", "-f", spec, "--admin-address", "none")
    wait_for_log(new, "listening on tcp 127.0.0.1:8080")
    old.proc.send_signal(signal.SIGTERM)  # the old pod is told to stop; it drains
    wait_for_log(old, " open connection(s) and ")  # "draining N …": its listener is closed
    os.kill(load.pid, signal.SIGUSR1)  # from here on, only the new instance accepts

    outcome = json.loads(load.expect_line(lambda line: line.startswith("{"), timeout=90))
    assert outcome["short_failed"] == 0 and outcome["long_failed"] == 0, outcome
    assert outcome["long_ok"] == 10  # the old instance's connections finished intact
    assert outcome["short_after_mark"] >= 200 and not outcome["timed_out"], outcome
    assert old.proc.wait(60) == 0  # and it left once they were done
    assert new.stop() == 0


def wait_for_log(process: nsutil.NsProcess, text: str) -> None:
    from tests.conftest import wait_for

    wait_for(lambda: text in process.stderr_text(), timeout=15, what=text)
