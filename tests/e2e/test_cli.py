"""The CLI as users run it: exit codes, messages, environment, SIGTERM drain."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from portproxy import __version__
from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess, run_cli
from tests.net.harness import EchoServer, free_port, recv_all

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_version() -> None:
    result = run_cli(["--version"])
    assert result.returncode == 0
    assert result.stdout.strip() == f"portproxy {__version__}"


def test_invalid_spec_exits_2_naming_the_part() -> None:
    result = run_cli(["run", "-f", "tcp://:99999=x:1"])
    assert result.returncode == 2
    assert ("invalid --forward 'tcp://:99999=x:1': port 99999 is out of range 1-65535"
            in result.stderr)


def test_invalid_flag_value_exits_2() -> None:
    result = run_cli(["run", "-f", "80=a:1", "--drain-timeout", "forever"])
    assert result.returncode == 2
    assert "--drain-timeout" in result.stderr


def test_invalid_global_option_names_the_flag() -> None:
    result = run_cli(["run", "-f", "80=a:1", "--allow", "10.0.0.0/8;10.0.0.0/33"])
    assert result.returncode == 2
    assert result.stderr.startswith(
        "portproxy: error: invalid --allow: '10.0.0.0/33' is not a CIDR")


def test_one_interface_port_per_family_is_no_duplicate() -> None:
    from portproxy.cli_settings import build_forwards
    from portproxy.errors import ConfigError
    from portproxy.spec import ForwardOptions

    forwards = build_forwards(["udp://eth0/ipv4:53=a:53", "udp://eth0/ipv6:53=b:53"],
                              ForwardOptions())
    assert [f.listen.family for f in forwards] == ["ipv4", "ipv6"]
    with pytest.raises(ConfigError, match="udp eth0:53 is already used by 'udp://eth0/ipv4"):
        build_forwards(["udp://eth0/ipv4:53=a:53", "udp://eth0:53=b:53"], ForwardOptions())


def test_no_forward_exits_2() -> None:
    result = run_cli(["run"], env={"PORTPROXY_FORWARD": ""})
    assert result.returncode == 2
    assert "no forwards given" in result.stderr


def test_duplicate_listen_exits_2() -> None:
    result = run_cli(["run", "-f", "tcp://:8080=a:1", "-f", "tcp+udp://:8080=b:1"])
    assert result.returncode == 2
    assert "is already used by 'tcp://:8080=a:1'" in result.stderr


def test_port_in_use_exits_3_naming_the_forward() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: nobody may share it
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = run_cli(["run", "-f", f"tcp://127.0.0.1:{port}=127.0.0.1:9", "--admin-address",
                          "none"])
    finally:
        holder.close()
    assert result.returncode == 3
    assert f"forward tcp/127.0.0.1:{port}: tcp 127.0.0.1:{port} is already in use" in \
        result.stderr


def test_udp_port_in_use_says_udp() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        result = run_cli(["run", "-f", f"tcp+udp://127.0.0.1:{port}=127.0.0.1:9",
                          "--admin-address", "none"])
    finally:
        holder.close()
    assert result.returncode == 3
    assert f"udp 127.0.0.1:{port} is already in use by another program (ss -lunp shows it)" \
        in result.stderr, result.stderr


def test_a_forward_on_the_admin_address_is_refused() -> None:
    # Both sockets set SO_REUSEPORT, so the kernel would split clients between the two.
    port = free_port()
    spelled = run_cli(["run", "-f", f"tcp://:{port}=127.0.0.1:9", "--admin-address",
                       f":{port}"])
    assert spelled.returncode == 2, spelled.stderr
    assert f"tcp *:{port} is also the --admin-address" in spelled.stderr
    # An interface's address is known once bound: the admin endpoint's claim finds it.
    bound = run_cli(["run", "-f", f"tcp://lo/ipv4:{port}=127.0.0.1:9", "--admin-address",
                     f"127.0.0.1:{port}"])
    assert bound.returncode == 3, bound.stderr
    assert (f"the admin endpoint: tcp 127.0.0.1:{port} is already served by forward "
            f"tcp/lo/ipv4:{port}") in bound.stderr
    empty = run_cli(["run", "-f", f"tcp://:{port}=127.0.0.1:9", "--admin-address", ""])
    assert empty.returncode == 2 and "invalid --admin-address ''" in empty.stderr


def test_an_invalid_interface_to_create_is_exit_2_for_check_too() -> None:
    for command in ("run", "check"):
        result = run_cli([command, "-f", f":{free_port()}=127.0.0.1:9", "--create-interface",
                          "x y", "--address", "10.1.1.1/32", "--admin-address", "none"])
        assert result.returncode == 2, (command, result.stderr)
        assert "invalid --create-interface: invalid interface name 'x y'" in result.stderr


BROKEN_KUBECONFIG = "apiVersion: v1\nclusters: [ {this is not yaml\n"


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_broken_kubeconfig_exits_3_in_one_line(tmp_path: Path, extra: list[str]) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(BROKEN_KUBECONFIG)
    port = free_port()
    result = run_cli(["run", "-f", f"tcp://127.0.0.1:{port}=default/web:80", "--kubeconfig",
                      str(kubeconfig), "--admin-address", "none", *extra])
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(
        f"portproxy: error: forward tcp/127.0.0.1:{port}: cannot load the Kubernetes client "
        f"configuration from kubeconfig {kubeconfig}: ")
    assert "--kubeconfig" in result.stderr  # says what to do
    assert result.stderr.count("\n") == 1


def test_broken_kubeconfig_with_only_a_configmap_exits_3(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(BROKEN_KUBECONFIG)
    result = run_cli(["run", "--tcp-services-configmap", "ingress/tcp-services",
                      "--kubeconfig", str(kubeconfig), "--admin-address", "none"])
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert (f"portproxy: error: cannot load the Kubernetes client configuration from "
            f"kubeconfig {kubeconfig}: ") in result.stderr


def test_env_forwards_and_sigterm_drain(backend: EchoServer) -> None:
    port_a, port_b = free_port(), free_port()
    specs = (f"tcp://127.0.0.1:{port_a}=127.0.0.1:{backend.port}\n"
             f"  tcp://127.0.0.1:{port_b}=127.0.0.1:{backend.port}")
    proc = PortproxyProcess(["run", "--drain-timeout", "20s", "--admin-address", "none"],
                            env={"PORTPROXY_FORWARD": specs})
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{port_a}")
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{port_b}")
        held = socket.create_connection(("127.0.0.1", port_a), timeout=10)
        held.sendall(b"before")
        assert held.recv(6, socket.MSG_WAITALL) == b"before"
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("draining 1 open connection")

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port_a), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False
        wait_for(refused, what="the listener to close")
        held.sendall(b"during the drain")  # the open connection keeps working
        held.shutdown(socket.SHUT_WR)
        assert recv_all(held) == b"during the drain"
        held.close()
        assert proc.wait(15) == 0
        assert "drain finished" in proc.output
    finally:
        proc.stop()


def test_drain_timeout_resets_what_is_left(backend: EchoServer) -> None:
    port = free_port()
    proc = PortproxyProcess(["run", "-f", f"127.0.0.1:{port}=127.0.0.1:{backend.port}",
                             "--drain-timeout", "300ms", "--admin-address", "none"])
    try:
        proc.wait_for_line("listening on tcp")
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        proc.signal(signal.SIGTERM)
        try:
            assert held.recv(1) == b""
        except ConnectionResetError:
            pass
        assert proc.wait(15) == 0
    finally:
        proc.stop()


def test_second_signal_stops_at_once(backend: EchoServer) -> None:
    port = free_port()
    proc = PortproxyProcess(["run", "-f", f"127.0.0.1:{port}=127.0.0.1:{backend.port}",
                             "--drain-timeout", "1h", "--admin-address", "none"])
    try:
        proc.wait_for_line("listening on tcp")
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("draining 1 open connection")
        proc.signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert "second signal" in proc.output
        held.close()
    finally:
        proc.stop()


@pytest.mark.parametrize("args,env", [
    (["--connect-timeout", "0"], {}),
    (["--connect-timeout", "0ms"], {}),
    ([], {"PORTPROXY_CONNECT_TIMEOUT": "0"}),
])
def test_connect_timeout_zero_is_refused_like_the_spec_option(
        args: list[str], env: dict[str, str]) -> None:
    # The spec option connect-timeout=0 is refused ("must be greater than 0"); so is the flag.
    result = run_cli(["check", "--offline", "-f", f"tcp://127.0.0.1:{free_port()}=127.0.0.1:1",
                      *args], env=env)
    assert result.returncode == 2, result.stderr
    source = " (from $PORTPROXY_CONNECT_TIMEOUT)" if env else ""
    assert f"'--connect-timeout'{source}: must be greater than 0" in result.stderr


def test_zero_idle_and_fin_timeout_flags_still_disable() -> None:
    result = run_cli(["check", "--offline", "-f", f"tcp://127.0.0.1:{free_port()}=127.0.0.1:1",
                      "--idle-timeout", "0", "--fin-timeout", "0s", "--drain-timeout", "0"])
    assert result.returncode == 0, result.stderr


def test_duration_flag_too_large_for_a_float_exits_2() -> None:
    # 400 digits parse as float('inf'): no timer takes that.
    result = run_cli(["check", "--offline", "-f", f"tcp://127.0.0.1:{free_port()}=127.0.0.1:1",
                      "--idle-timeout", "9" * 400])
    assert result.returncode == 2, result.stderr
    assert "'--idle-timeout'" in result.stderr and "too large" in result.stderr


@pytest.mark.parametrize("way", ["flag", "env"])
def test_global_wait_interface_reaches_interface_forwards_only(way: str) -> None:
    specs = ["-f", f"tcp://ppxnone0:{free_port()}=127.0.0.1:1",
             "-f", f"tcp://127.0.0.1:{free_port()}=127.0.0.1:1"]
    without = run_cli(["check", "--offline", *specs])
    assert without.returncode == 3 and "add wait-interface" in without.stdout, without.stdout
    args, env = (["--wait-interface"], {}) if way == "flag" else \
        ([], {"PORTPROXY_WAIT_INTERFACE": "1"})
    result = run_cli(["check", "--offline", *args, *specs], env=env)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(Path("/proc/sys/net/ipv4/ip_nonlocal_bind").exists() and
                    Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() == "1",
                    reason="net.ipv4.ip_nonlocal_bind=1: any address binds, freebind or not")
def test_global_freebind_binds_an_address_this_host_lacks() -> None:
    # 192.0.2.0/24 is TEST-NET-1: no host has it. IPv4 forwards only; an all-addresses
    # forward beside it takes no freebind (and is no error).
    specs = ["-f", f"tcp://192.0.2.7:{free_port()}=127.0.0.1:1",
             "-f", f"tcp://:{free_port()}=127.0.0.1:1"]
    without = run_cli(["check", "--offline", *specs])
    assert without.returncode == 3, without.stdout + without.stderr
    result = run_cli(["check", "--offline", "--freebind", *specs])
    assert result.returncode == 0, result.stdout + result.stderr


def test_portproxy_offline_is_read_from_the_environment() -> None:
    # A Service target with --offline is not resolved, so no cluster is needed.
    spec = f"tcp://127.0.0.1:{free_port()}=ns/svc:80"
    result = run_cli(["check", "-f", spec], env={"PORTPROXY_OFFLINE": "1",
                                                  "KUBECONFIG": "/nonexistent"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_failing_credential_plugin_is_reported_without_its_output(tmp_path) -> None:
    # The kubernetes client logs a failed exec plugin with its stderr, which may hold a
    # secret: portproxy's handler keeps the failure and drops the output.
    import json

    with socket.socket() as closed:  # bound, never listening: the API is unreachable
        closed.bind(("127.0.0.1", 0))
        server = f"http://127.0.0.1:{closed.getsockname()[1]}"
        plugin = {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                  "args": ["-c", "import sys; sys.stderr.write('password=HUNTER2'); "
                                 "sys.exit(1)"], "interactiveMode": "Never"}
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "c", "cluster": {"server": server}}],
            "users": [{"name": "u", "user": {"exec": plugin}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
        result = run_cli(["check", "-f", f"tcp://127.0.0.1:{free_port()}=ns/svc:80",
                          "--kubeconfig", str(kubeconfig)], timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "credential plugin failed (exec: process returned 1)" in output, output
    assert "HUNTER2" not in output


def private_mounts_available() -> bool:
    """Whether unshare(1) can make a private mount namespace here (root with
    CAP_SYS_ADMIN: a plain container lacks it)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not private_mounts_available(),
                    reason="needs unshare(1) and the right to make a private mount namespace")
def test_no_writable_temporary_directory_gets_a_hint_that_fits(tmp_path) -> None:
    # A read-only container (docker run --read-only) with a kubeconfig holding inline
    # certificate data: the client has nowhere to write them. /tmp and /var/tmp made
    # read-only in a private mount namespace stand in for that container (remounted in
    # place, not hidden: this checkout and its interpreter may well live under /tmp).
    import base64
    import json

    ca = base64.b64encode(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1",
                                               "certificate-authority-data": ca.decode()}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    portproxy = shlex.join([sys.executable, "-m", "portproxy", "check", "-f",
                            f"tcp://127.0.0.1:{free_port()}=ns/svc:80",
                            "--kubeconfig", str(kubeconfig)])
    read_only = "".join(f"mount --bind {d} {d}; mount -o remount,bind,ro {d}; "
                        for d in ("/tmp", "/var/tmp") if os.path.isdir(d))
    script = f"set -e; {read_only}cd /tmp; {portproxy}"
    # Without TMPDIR and friends: tempfile tries them before /tmp and /var/tmp.
    env = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "TEMP", "TMP")}
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script], capture_output=True, text=True, timeout=60,
                            env={**env, "PYTHONPATH": str(REPO_ROOT)})
    output = result.stdout + result.stderr
    assert result.returncode == 3, output
    assert "No usable temporary directory" in output, output
    assert "mount a writable /tmp (docker run --tmpfs /tmp" in output


def test_a_bad_value_from_the_environment_names_the_variable() -> None:
    spec = f"tcp://127.0.0.1:{free_port()}=127.0.0.1:1"
    from_env = run_cli(["check", "--offline", "-f", spec],
                       env={"PORTPROXY_DRAIN_TIMEOUT": "abc"})
    assert from_env.returncode == 2, from_env.stderr
    assert "'--drain-timeout' (from $PORTPROXY_DRAIN_TIMEOUT): invalid duration 'abc'" in \
        from_env.stderr, from_env.stderr
    from_flag = run_cli(["check", "--offline", "-f", spec, "--drain-timeout", "abc"])
    assert from_flag.returncode == 2
    assert "'--drain-timeout': invalid duration 'abc'" in from_flag.stderr, from_flag.stderr


@pytest.mark.parametrize(("args", "code"), [
    (["run", "-f", "tcp://:99999=x:1"], 2),
    (["check", "--offline", "-f", "tcp://127.0.0.1:{held}=127.0.0.1:2"], 3),
    (["check", "--offline", "-f", "tcp://127.0.0.1:{free}=127.0.0.1:2"], 0),
], ids=["invalid", "check-fails", "check-passes"])
def test_exit_codes_hold_when_the_output_is_a_closed_pipe(args: list[str], code: int) -> None:
    # A caller that stopped reading (closed pipes) must still learn what happened: the
    # failed write used to become "unexpected BrokenPipeError", exit 1.
    read, write = os.pipe()
    os.close(read)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        ports = {"held": holder.getsockname()[1], "free": free_port()}
        try:
            done = subprocess.run(
                [sys.executable, "-m", "portproxy", *(a.format(**ports) for a in args)],
                stdout=write, stderr=write, timeout=30, check=False)
        finally:
            os.close(write)
    assert done.returncode == code
