"""Operating portproxy: check, the legacy argv, config files, SIGHUP reload, env precedence."""

from __future__ import annotations

import json
import os
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

from portproxy.cli import legacy_spec
from tests.conftest import wait_for
from tests.e2e.cli import PortproxyProcess, run_cli
from tests.net.harness import EchoServer, free_port, free_tcp_udp_port, recv_all


def test_check_offline_prints_a_table_and_passes() -> None:
    port = free_port()
    result = run_cli(["check", "--offline", "-f", f"tcp+udp://127.0.0.1:{port}=kube-system/"
                      "kube-dns:dns", "-f", f"tcp://127.0.0.1:{free_port()}=10.0.0.1:80"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["FORWARD", "LISTEN", "TARGET", "MODE", "ENDPOINTS", "STATUS"]
    assert f"tcp+udp 127.0.0.1:{port}" in lines[1]
    assert "kube-system/kube-dns:dns" in lines[1] and lines[1].endswith("ok")


def test_check_reports_port_in_use_and_unresolvable_target() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        result = run_cli(["check", "-f", f"tcp://127.0.0.1:{port}=127.0.0.1:1",
                          "-f", f"tcp://127.0.0.1:{free_port()}=no-such-host.invalid:80"])
    finally:
        holder.close()
    assert result.returncode == 3
    assert "is already in use" in result.stdout
    assert "cannot resolve no-such-host.invalid" in result.stdout


def test_check_resolves_a_static_target(backend: EchoServer) -> None:
    result = run_cli(["check", "-f", f"tcp://127.0.0.1:{free_port()}=localhost:"
                      f"{backend.port}"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dns" in result.stdout and "ok" in result.stdout


@pytest.mark.parametrize("args,cluster,spec", [
    (("udp", 53, "kube-dns.default", 1.0), True,
     "udp://:53=default/kube-dns:53,idle-timeout=1,mode=clusterip"),
    (("tcp", 80, "web.prod.svc.cluster.local", None), True,
     "tcp://:80=prod/web:80,mode=clusterip"),
    (("udp", 53, "kube-dns.default", 1.0), False, "udp://:53=kube-dns.default:53,idle-timeout=1"),
    (("tcp", 8080, "backend", 2.5), True, "tcp://:8080=backend:8080,idle-timeout=2.5"),
    # An absolute name is a host, not name.namespace.
    (("tcp", 443, "example.com.", None), True, "tcp://:443=example.com.:443"),
])
def test_legacy_argv_becomes_a_spec(args: tuple, cluster: bool, spec: str) -> None:
    assert legacy_spec(*args, cluster=cluster) == spec


# 1000000 s used to become "idle-timeout=1e+06", which the spec parser refuses (exit 2).
# With PORTPROXY_CONFIG, SIGHUP used to re-read the file under the legacy argv taken as `run`
# flags, and was rejected.
@pytest.mark.parametrize("timeout,config", [("5", False), ("1000000", False), ("5", True)],
                         ids=["plain", "large-timeout", "config-reload"])
def test_legacy_argv_forwards_traffic(tmp_path: Path, timeout: str, config: bool) -> None:
    # The legacy argv forwards PORT on all addresses to SERVICE:PORT, the same port number.
    # The backend listens on 127.0.0.2 (SO_REUSEPORT lets portproxy's wildcard listener share
    # the port; the kernel delivers to the most specific address), clients use 127.0.0.1.
    backend = EchoServer("127.0.0.2", reuseport=True)
    env = {"PORTPROXY_ADMIN_ADDRESS": "none", "KUBECONFIG": str(tmp_path / "absent"),
           "KUBERNETES_SERVICE_HOST": ""}
    if config:
        env["PORTPROXY_CONFIG"] = str(write(tmp_path / "c.toml", 'drain-timeout = "10s"\n'))
    proc = PortproxyProcess(["tcp", str(backend.port), "127.0.0.2", timeout], env=env)

    def exchange(payload: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", backend.port), timeout=10) as client:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
            return recv_all(client)
    try:
        proc.wait_for_line("listening on tcp")
        assert exchange(b"legacy") == b"legacy"
        assert backend.accepted == 1
        if config:
            write(tmp_path / "c.toml", 'drain-timeout = "20s"\n')
            proc.signal(signal.SIGHUP)
            proc.wait_for_line("reloaded: 1 unchanged, 0 added, 0 removed")
            assert exchange(b"after reload") == b"after reload"
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.stop()
        backend.close()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_env_and_flag_precedence(backend: EchoServer, tmp_path: Path) -> None:
    port = free_port()
    config = write(tmp_path / "portproxy.toml", f"""
drain-timeout = "7s"
admin-address = "none"
[[forward]]
spec = "tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}"
name = "from-file"
""")
    proc = PortproxyProcess(["run", "--config", str(config), "--log-level", "info"],
                            env={"PORTPROXY_DRAIN_TIMEOUT": "9s"})
    try:
        proc.wait_for_line(f"forward from-file: listening on tcp 127.0.0.1:{port}")
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("draining for up to 9s")  # environment beats the file
        assert proc.wait(15) == 0
    finally:
        proc.stop()
    result = run_cli(["check", "--offline", "--config", str(config)])
    assert result.returncode == 0 and "from-file" in result.stdout


def test_config_file_unknown_key_names_key_and_line(tmp_path: Path) -> None:
    config = write(tmp_path / "bad.toml", 'forwards = ["80=a:1"]\n\ndrian-timeout = "5s"\n')
    result = run_cli(["run", "--config", str(config)])
    assert result.returncode == 2
    assert "drian-timeout" in result.stderr and "3" in result.stderr


def admin_json(port: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())


def test_sighup_reload_keeps_unchanged_drains_removed_rejects_broken(
        backend: EchoServer, tmp_path: Path) -> None:
    keep, drop, new, admin = free_port(), free_port(), free_port(), free_port()
    spec_keep = f"tcp://127.0.0.1:{keep}=127.0.0.1:{backend.port}"
    spec_drop = f"tcp://127.0.0.1:{drop}=127.0.0.1:{backend.port}"
    spec_new = f"tcp://127.0.0.1:{new}=127.0.0.1:{backend.port}"
    config = write(tmp_path / "c.toml", f'admin-address = "127.0.0.1:{admin}"\n'
                   f'forwards = ["{spec_keep}", "{spec_drop}"]\n')
    proc = PortproxyProcess(["run", "--config", str(config), "--drain-timeout", "20s"])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{keep}")
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{drop}")
        long_lived = socket.create_connection(("127.0.0.1", keep), timeout=10)
        on_dropped = socket.create_connection(("127.0.0.1", drop), timeout=10)
        sent = bytearray()
        for conn in (long_lived, on_dropped):
            conn.sendall(b"before reload")
            assert conn.recv(13, socket.MSG_WAITALL) == b"before reload"
        sent += b"before reload"

        write(config, f'admin-address = "127.0.0.1:{admin}"\nforwards = ["{spec_keep}", '
              f'"{spec_new}"]\n')
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("reloaded: 1 unchanged, 1 added, 1 removed")
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{new}")
        with socket.create_connection(("127.0.0.1", new), timeout=10) as fresh:
            fresh.sendall(b"new forward")
            assert fresh.recv(11, socket.MSG_WAITALL) == b"new forward"

        def drop_refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", drop), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False
        wait_for(drop_refused, what="the removed forward to stop accepting")
        on_dropped.sendall(b"still draining")  # the removed forward's connection lives on
        assert on_dropped.recv(14, socket.MSG_WAITALL) == b"still draining"
        # Listed while it drains, with its connection; no reason to be unready.
        forwards = admin_json(admin, "/forwards")
        draining = [f for f in forwards if f["draining"]]  # type: ignore[index, union-attr]
        assert [(f["name"], f["active_connections"]) for f in draining] == [
            (f"tcp/127.0.0.1:{drop}", 1)], forwards
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=5) as answer:
            assert answer.status == 200
        on_dropped.close()

        write(config, "forwards = [ this is not toml")
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("reload rejected")
        wait_for(lambda: len(admin_json(admin, "/forwards")) == 2,  # type: ignore[arg-type]
                 what="the drained forward to leave /forwards")
        names = {f["name"] for f in admin_json(admin, "/forwards")}  # type: ignore[union-attr]
        assert names == {f"tcp/127.0.0.1:{keep}", f"tcp/127.0.0.1:{new}"}

        payload = os.urandom(1 << 20)
        long_lived.sendall(payload)
        long_lived.shutdown(socket.SHUT_WR)
        assert recv_all(long_lived) == payload  # untouched by both reloads, byte-exact
        long_lived.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_reload_adding_a_service_with_a_broken_kubeconfig_keeps_running(
        backend: EchoServer, tmp_path: Path, extra: list[str]) -> None:
    kept, service = free_port(), free_port()
    spec_kept = f"tcp://127.0.0.1:{kept}=127.0.0.1:{backend.port}"
    kubeconfig = write(tmp_path / "kubeconfig", "clusters: [ {not yaml\n")
    config = write(tmp_path / "c.toml", f'admin-address = "none"\nforwards = ["{spec_kept}"]\n')
    proc = PortproxyProcess(["run", "--config", str(config), "--kubeconfig", str(kubeconfig),
                             *extra])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{kept}")
        write(config, f'admin-address = "none"\nforwards = ["{spec_kept}", '
              f'"tcp://127.0.0.1:{service}=default/web:80"]\n')
        proc.signal(signal.SIGHUP)
        line = proc.wait_for_line("reload failed, keeping the running configuration")
        assert (f"forward tcp/127.0.0.1:{service}: cannot load the Kubernetes client "
                f"configuration from kubeconfig {kubeconfig}") in line
        with socket.create_connection(("127.0.0.1", kept), timeout=10) as client:
            client.sendall(b"still here")
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"still here"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", service), timeout=10).close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "Traceback" not in proc.output
    finally:
        proc.stop()


def echo_once(conn: socket.socket, payload: bytes) -> bytes:
    conn.sendall(payload)
    return conn.recv(len(payload), socket.MSG_WAITALL)


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_a_reload_while_draining_is_ignored_and_the_drain_ends(
        backend: EchoServer, tmp_path: Path, extra: list[str]) -> None:
    kept, added = free_port(), free_port()
    spec_kept = f"tcp://127.0.0.1:{kept}=127.0.0.1:{backend.port}"
    config = write(tmp_path / "c.toml", f'admin-address = "none"\nforwards = ["{spec_kept}"]\n')
    proc = PortproxyProcess(["run", "--config", str(config), "--drain-timeout", "60s", *extra])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{kept}")
        live = socket.create_connection(("127.0.0.1", kept), timeout=10)
        assert echo_once(live, b"before") == b"before"
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("draining for up to")
        write(config, f'admin-address = "none"\nforwards = ["{spec_kept}", '
              f'"tcp://127.0.0.1:{added}=127.0.0.1:{backend.port}"]\n')
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("stopping: configuration change ignored")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", added), timeout=10).close()
        assert echo_once(live, b"draining") == b"draining"
        live.close()  # the last connection: the drain ends now, not at its timeout
        assert proc.wait(30) == 0
        assert f"listening on tcp 127.0.0.1:{added}" not in proc.output
    finally:
        proc.stop()


def test_a_second_signal_also_ends_forwards_a_reload_removed(
        backend: EchoServer, tmp_path: Path) -> None:
    old, new = free_port(), free_port()
    spec_old = f"tcp://127.0.0.1:{old}=127.0.0.1:{backend.port}"
    spec_new = f"tcp://127.0.0.1:{new}=127.0.0.1:{backend.port}"
    config = write(tmp_path / "c.toml", f'admin-address = "none"\nforwards = ["{spec_old}"]\n')
    proc = PortproxyProcess(["run", "--config", str(config), "--drain-timeout", "120s"])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{old}")
        on_removed = socket.create_connection(("127.0.0.1", old), timeout=10)
        assert echo_once(on_removed, b"before") == b"before"
        write(config, f'admin-address = "none"\nforwards = ["{spec_new}"]\n')
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("reloaded: 0 unchanged, 1 added, 1 removed")
        assert echo_once(on_removed, b"draining") == b"draining"
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("draining for up to")
        proc.signal(signal.SIGTERM)
        proc.wait_for_line("second signal")
        on_removed.settimeout(30)
        try:
            assert on_removed.recv(1) == b""
        except ConnectionResetError:
            pass  # closed at once, with an RST
        on_removed.close()
        assert proc.wait(30) == 0  # not after the 120 s drain timeout
    finally:
        proc.stop()


def http_get(port: int, path: str) -> tuple[int, str]:
    import urllib.error

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_readyz_waits_for_resolution_and_metrics_move(backend: EchoServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    ok_port, bad_port, admin = free_port(), free_port(), free_port()
    proc = PortproxyProcess([
        "run", "-f", f"tcp://127.0.0.1:{ok_port}=127.0.0.1:{backend.port}",
        "-f", f"tcp://127.0.0.1:{bad_port}=unresolvable.invalid:80",
        "--admin-address", f"127.0.0.1:{admin}"])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{ok_port}")
        status, body = http_get(admin, "/readyz")
        assert status == 503
        assert f"tcp/127.0.0.1:{bad_port}" in body and "not resolved" in body
        assert f"tcp/127.0.0.1:{ok_port} " not in body
        assert http_get(admin, "/healthz")[0] == 200

        def samples() -> dict[tuple[str, str], float]:
            text = http_get(admin, "/metrics")[1]
            values = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    key = (sample.name, ",".join(f"{k}={v}" for k, v in
                                                 sorted(sample.labels.items())))
                    values[key] = sample.value
            return values
        forward = f"forward=tcp/127.0.0.1:{ok_port}"
        before = samples()
        with socket.create_connection(("127.0.0.1", ok_port), timeout=10) as client:
            client.sendall(b"m" * 1000)
            client.shutdown(socket.SHUT_WR)
            assert recv_all(client) == b"m" * 1000
        wait_for(lambda: samples().get(("portproxy_connections_closed_total",
                                        f"{forward},reason=ok")) == 1, what="the close")
        after = samples()
        assert after[("portproxy_connections_total", f"{forward},result=ok")] == \
            before.get(("portproxy_connections_total", f"{forward},result=ok"), 0) + 1
        assert after[("portproxy_bytes_total", f"direction=upstream,{forward}")] == 1000
        assert after[("portproxy_bytes_total", f"direction=downstream,{forward}")] == 1000
        assert after[("portproxy_upstream_connect_seconds_count", forward)] == 1
        # Measured, not read off a clock cached to the millisecond (uvloop's): a loopback
        # connect takes microseconds, which such a clock reads as 0.
        assert after[("portproxy_upstream_connect_seconds_sum", forward)] > 0
        assert after[("portproxy_endpoints", forward)] == 1
        proc.signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        proc.stop()


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_a_removed_forward_leaves_metrics_once_drained(
        backend: EchoServer, tmp_path: Path, extra: list[str]) -> None:
    old, new, admin = free_port(), free_port(), free_port()
    forwards = {
        "old": f"tcp://127.0.0.1:{old}=127.0.0.1:{backend.port},name=old",
        "new": f"tcp://127.0.0.1:{new}=127.0.0.1:{backend.port},name=new",
    }

    def configure(*names: str) -> None:
        listed = ", ".join(f'"{forwards[n]}"' for n in names)
        write(tmp_path / "c.toml", f'admin-address = "127.0.0.1:{admin}"\n'
                                   f"forwards = [{listed}]\n")

    def series(name: str) -> list[str]:
        status, body = http_get(admin, "/metrics")
        assert status == 200
        return [line for line in body.splitlines()
                if f'forward="{name}"' in line and not line.startswith("#")]

    configure("old")
    proc = PortproxyProcess(["run", "--config", str(tmp_path / "c.toml"), *extra])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{old}")
        with socket.create_connection(("127.0.0.1", old), timeout=10) as client:
            assert echo_once(client, b"counted") == b"counted"
        wait_for(lambda: any("portproxy_connections_total" in line for line in series("old")),
                 what="the old forward's connection counted")
        configure("new")
        proc.signal(signal.SIGHUP)
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{new}")
        wait_for(lambda: not series("old"), what="the removed forward's series to go")
        assert any("portproxy_endpoints" in line for line in series("new"))
        proc.signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.stop()


# ------------------------------------------------- config-file values checked as the flags'

def check_config(tmp_path: Path, text: str) -> tuple[int, str]:
    """``check --offline`` on a config file of ``text`` (line 1) and one static forward."""
    config = write(tmp_path / "values.toml", f'{text}\nforwards = '
                   f'["tcp://127.0.0.1:{free_port()}=127.0.0.1:1"]\n')
    env = {k: "" for k in os.environ if k.startswith("PORTPROXY_")}
    result = run_cli(["check", "--offline", "--config", str(config)], env=env)
    return result.returncode, result.stderr


def parsed_run_params(args: list[str], env: dict[str, str] | None = None) -> dict[str, object]:
    """``run``'s parameters as click builds them from ``args``, the environment and the config
    file, stopping before the daemon would start."""
    import click
    from click.testing import CliRunner

    from portproxy.cli import main

    seen: dict[str, object] = {}
    run = main.commands["run"]
    parse_only = click.Command("run", params=run.params, callback=lambda **kw: seen.update(kw))
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PORTPROXY_")}
    result = CliRunner().invoke(parse_only, args, env={**clean, **(env or {})})
    assert result.exit_code == 0, result.output
    return seen


@pytest.mark.parametrize("line", [
    "idle-timeout = inf", "idle-timeout = -1", "idle-timeout = -0.5", "idle-timeout = nan",
    "connect-timeout = nan", "connect-timeout = -1", "connect-timeout = inf",
    "connect-timeout = 0", "connect-timeout = 0.0", 'connect-timeout = "0ms"',
    "fin-timeout = -inf", 'fin-timeout = "-1s"', "fin-timeout = true",
    "drain-timeout = -5", "drain-timeout = 1e400", "drain-timeout = 1" + "0" * 400,
    'idle-timeout = "' + "9" * 400 + '"',
    # Whole numbers are TOML integers: 1.9 is an error, not 1.
    "max-flows = 1.9", "workers = 2.7", "responses = 1.0", "max-conns = true",
    "workers = 0", "max-flows = -1", "workers = 65",
])
def test_config_file_values_are_checked_like_the_flags(tmp_path: Path, line: str) -> None:
    # A number from the file is seconds, but finite and >= 0 as any duration, and zero only
    # where the flag and spec option allow it (not connect-timeout); else exit 2 with the key
    # and its line, not an error in an event-loop callback on every connection.
    code, stderr = check_config(tmp_path, line)
    key = line.split(" = ")[0]
    assert code == 2, stderr
    assert f"values.toml, line 1: {key}: " in stderr, stderr


@pytest.mark.parametrize("line", [
    "idle-timeout = 0", "fin-timeout = 0", "drain-timeout = 0", 'idle-timeout = "0s"',
    "connect-timeout = 0.5", 'connect-timeout = "250ms"', "idle-timeout = 90",
])
def test_config_file_durations_keep_their_valid_forms(tmp_path: Path, line: str) -> None:
    code, stderr = check_config(tmp_path, line)
    assert code == 0, stderr


@pytest.mark.parametrize("line,error", [
    ('allow = ["10.0.0.0/8", "10.0.0.0/33"]', "allow: '10.0.0.0/33' is not a CIDR"),
    ('allow = ["10.0.0.0/8", 8]', "allow: expected a list of CIDR strings"),
    ('allow = "10.0.0.0/33"', "allow: '10.0.0.0/33' is not a CIDR"),
    ('address = ["169.254.20.10/32", "nope"]', "address: 'nope' is not an IP address"),
    ("context = true", "context: expected a string, got True"),
    ('log-level = ["info"]', "log-level: expected a single value, not a list"),
    ('kube-context = "production"', "unknown key 'kube-context' (did you mean 'context'?)"),
    ('addresses = ["169.254.20.10/32"]', "unknown key 'addresses' (did you mean 'address'?)"),
])
def test_config_file_bad_values_name_key_and_line(tmp_path: Path, line: str, error: str) -> None:
    code, stderr = check_config(tmp_path, line)
    assert code == 2, stderr
    assert f"values.toml, line 1: {error}" in stderr, stderr


def test_config_file_keys_are_the_flag_names_and_lists_work(tmp_path: Path) -> None:
    # `context` and `address` as their flags --context and --address; `allow` and `address`
    # as TOML lists (allow: the same as ';'-separated; address: the repeated flag).
    config = write(tmp_path / "keys.toml", """\
context = "production"
create-interface = "pp0"
address = ["169.254.20.10/32", "fd00::10/128"]
allow = ["10.0.0.0/8", "fd00::/8"]
max-flows = 7
connect-timeout = 2
forwards = ["tcp://127.0.0.1:9=127.0.0.1:1"]
""")
    params = parsed_run_params(["--config", str(config)])
    assert params["kube_context"] == "production"
    assert params["addresses"] == ("169.254.20.10/32", "fd00::10/128")
    assert params["allow"] == "10.0.0.0/8;fd00::/8"
    assert params["max_flows"] == 7 and params["connect_timeout"] == 2.0
    # A single string is one address; flags still beat the file.
    write(config, 'create-interface = "pp0"\naddress = "169.254.20.11/32"\n'
                  'allow = ["10.0.0.0/8"]\n')
    params = parsed_run_params(["--config", str(config), "--allow", "192.168.0.0/16"])
    assert params["addresses"] == ("169.254.20.11/32",)
    assert params["allow"] == "192.168.0.0/16"
    # The whole CLI agrees (check validates the daemon-only flags too).
    code, stderr = check_config(tmp_path, 'context = "production"\ncreate-interface = "pp0"\n'
                                'address = ["169.254.20.10/32"]\nallow = ["10.0.0.0/8"]')
    assert code == 0, stderr


def test_example_config_settings_can_all_be_uncommented(tmp_path: Path) -> None:
    # examples/config.toml shows the other top-level settings commented out: each of them,
    # uncommented, is a valid key with a valid value.
    import re

    example = (Path(__file__).resolve().parents[2] / "examples" / "config.toml").read_text()
    head, sep, tail = example.partition("\nforwards = [")
    uncommented = re.sub(r"^# ([a-z][a-z0-9-]*) = ", r"\1 = ", head, flags=re.M)
    assert uncommented.count("\ncontext = ") == uncommented.count("\naddress = ") == 1
    config = write(tmp_path / "example.toml", uncommented + sep + tail)
    params = parsed_run_params(["--config", str(config)])
    assert params["kube_context"] == "production"
    assert params["addresses"] == ("169.254.20.10/32",)
    assert params["create_interface"] == "portproxy0"
    assert params["allow"] == "10.0.0.0/8;192.168.0.0/16"
    assert params["kubeconfig"] == "/etc/portproxy/kubeconfig"


@pytest.mark.parametrize("timeout,text", [
    (1000000.0, "1000000"), (1234567.5, "1234567.5"), (0.00001, "0.00001"), (0.1, "0.1"),
    (3600.0, "3600"), (1e18, "1000000000000000000"), (0.0, "0"),
])
def test_legacy_timeout_round_trips_through_the_spec(timeout: float, text: str) -> None:
    from portproxy.spec import parse_forward

    spec = legacy_spec("udp", 53, "kube-dns.default", timeout, cluster=False)
    assert spec == f"udp://:53=kube-dns.default:53,idle-timeout={text}"
    assert parse_forward(spec).options.idle_timeout == timeout


@pytest.mark.parametrize("timeout", ["inf", "nan", "-1"])
def test_legacy_timeout_must_be_finite_seconds(timeout: str) -> None:
    result = run_cli(["tcp", str(free_port()), "127.0.0.1", timeout],
                     env={"PORTPROXY_ADMIN_ADDRESS": "none"})
    assert result.returncode == 2
    assert "TIMEOUT" in result.stderr


@pytest.mark.parametrize("how", ["PORTPROXY_KUBECONFIG", "PORTPROXY_CONFIG"])
def test_legacy_service_uses_the_kubeconfig_run_would_use(tmp_path: Path, how: str) -> None:
    # `run` reads --kubeconfig from PORTPROXY_KUBECONFIG or the config file's `kubeconfig` key
    # before $KUBECONFIG; the legacy argv decides Service-vs-DNS by the same rule. The broken
    # kubeconfig proves which one is used: the Service target fails to load it (exit 3) where
    # a DNS target would have started listening.
    kubeconfig = write(tmp_path / "kubeconfig", "apiVersion: v1\nclusters: [ {not yaml\n")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "KUBECONFIG": str(tmp_path / "absent"),
           "KUBERNETES_SERVICE_HOST": "", "PORTPROXY_ADMIN_ADDRESS": "none"}
    if how == "PORTPROXY_KUBECONFIG":
        env["PORTPROXY_KUBECONFIG"] = str(kubeconfig)
    else:
        env["PORTPROXY_CONFIG"] = str(write(tmp_path / "c.toml",
                                            f'kubeconfig = "{kubeconfig}"\n'))
    result = run_cli(["tcp", str(free_port()), "web.default"], env=env, timeout=20)
    assert result.returncode == 3, result.stderr
    assert f"configuration from kubeconfig {kubeconfig}" in result.stderr


def test_legacy_in_cluster_needs_the_mounted_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from portproxy.cli import _cluster_config_available

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    sa_dir = str(tmp_path / "sa")
    # `run` uses the service account only when its token is mounted...
    assert not _cluster_config_available(None, None, serviceaccount_dir=sa_dir)
    os.mkdir(sa_dir)
    write(tmp_path / "sa" / "token", "t")
    assert _cluster_config_available(None, None, serviceaccount_dir=sa_dir)
    # ...and no kubeconfig or context is given; then that kubeconfig decides.
    assert not _cluster_config_available(str(tmp_path / "nope"), None, serviceaccount_dir=sa_dir)
    assert not _cluster_config_available(None, "prod", serviceaccount_dir=sa_dir)
    write(tmp_path / "kc", "apiVersion: v1\n")
    assert _cluster_config_available(f"{tmp_path / 'nope'}:{tmp_path / 'kc'}", "prod",
                                     serviceaccount_dir=sa_dir)


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_sighup_without_a_config_file_is_ignored_not_fatal(
        backend: EchoServer, extra: list[str]) -> None:
    port = free_port()
    proc = PortproxyProcess(["run", *extra, "-f", f"tcp://127.0.0.1:{port}=127.0.0.1:"
                             f"{backend.port}", "--admin-address", "none"])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{port}")
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        held.sendall(b"before")
        assert held.recv(6, socket.MSG_WAITALL) == b"before"
        proc.signal(signal.SIGHUP)  # the default action would end the process, and `held`
        proc.wait_for_line("SIGHUP ignored")
        held.sendall(b"after")
        assert held.recv(5, socket.MSG_WAITALL) == b"after"
        held.close()
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


@pytest.mark.parametrize("extra", [[], ["--workers", "2"]], ids=["daemon", "workers"])
def test_a_reload_says_which_settings_wait_for_a_restart(
        backend: EchoServer, tmp_path: Path, extra: list[str]) -> None:
    first, second, admin, other_admin = free_port(), free_port(), free_port(), free_port()

    def spec(port: int) -> str:
        return f"tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}"
    config = write(tmp_path / "c.toml", f'admin-address = "127.0.0.1:{admin}"\n'
                   f'forwards = ["{spec(first)}"]\n')
    proc = PortproxyProcess(["run", *extra, "--config", str(config)])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{first}")
        write(config, f'admin-address = "127.0.0.1:{other_admin}"\nlog-format = "json"\n'
              f'forwards = ["{spec(first)}", "{spec(second)}"]\n')
        proc.signal(signal.SIGHUP)
        line = proc.wait_for_line("takes effect only at a restart")
        assert "admin-address, log-format changed" in line
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{second}")  # the forwards did change
        after = proc.lines[proc.lines.index(line):]
        assert not [entry for entry in after if entry.startswith("{")]  # still text logs
        names = {f["name"] for f in admin_json(admin, "/forwards")}  # type: ignore[union-attr]
        assert names == {f"tcp/127.0.0.1:{first}", f"tcp/127.0.0.1:{second}"}
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def test_a_global_proxy_protocol_v1_heads_tcp_only(tmp_path: Path) -> None:
    """`--proxy-protocol v1` beside UDP: the TCP side gets the header, UDP none (it has no v1),
    and that is no error."""
    backend_port, port = free_tcp_udp_port(), free_tcp_udp_port()
    tcp_backend = socket.create_server(("127.0.0.1", backend_port))
    udp_backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_backend.bind(("127.0.0.1", backend_port))
    udp_backend.settimeout(10)
    tcp_backend.settimeout(10)
    proc = PortproxyProcess(["run", "--proxy-protocol", "v1", "--admin-address", "none",
                             "-f", f"tcp+udp://127.0.0.1:{port}=127.0.0.1:{backend_port}"])
    try:
        proc.wait_for_line(f"listening on udp 127.0.0.1:{port}")
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"over tcp")
            client.shutdown(socket.SHUT_WR)
            upstream, _ = tcp_backend.accept()
            with upstream:
                upstream.settimeout(10)
                received = recv_all(upstream)
            source = client.getsockname()[1]
        assert received == (f"PROXY TCP4 127.0.0.1 127.0.0.1 {source} {port}\r\n"
                            "over tcp").encode()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"over udp", ("127.0.0.1", port))
            assert udp_backend.recvfrom(2048)[0] == b"over udp"  # no header at all
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
        tcp_backend.close()
        udp_backend.close()


def test_two_forwards_on_one_bound_address_fail_the_start() -> None:
    # lo:P binds 127.0.0.1:P (and ::1): with SO_REUSEPORT the kernel would take both
    # forwards and split clients between their targets. Only the bind shows it: exit 3.
    port = free_port()
    specs = ["-f", f"tcp://lo:{port}=127.0.0.1:1", "-f", f"tcp://127.0.0.1:{port}=127.0.0.1:2"]
    for command in (["run", "--admin-address", "none"], ["check", "--offline"]):
        result = run_cli([*command, *specs], timeout=60)
        output = result.stdout + result.stderr
        assert result.returncode == 3, output
        assert f"forward tcp/127.0.0.1:{port}: tcp 127.0.0.1:{port} is already served by " \
               f"forward tcp/lo:{port}," in output, output


@pytest.mark.parametrize("first,second", [
    ("{}", "[::]:{}"), ("{}", "0.0.0.0:{}"), ("[::ffff:127.0.0.1]:{}", "127.0.0.1:{}")],
    ids=["all-and-ipv6-any", "all-and-ipv4-any", "mapped-and-ipv4"])
def test_two_spellings_of_one_address_are_invalid(first: str, second: str) -> None:
    # All addresses is both wildcards: beside [::] the two would split IPv6 clients, beside
    # 0.0.0.0 the kernel would give every IPv4 client to the latter; an IPv4-mapped address
    # is its IPv4 address. The text tells: exit 2.
    port = free_port()
    spec = f"tcp://{first.format(port)}=127.0.0.1:1"
    result = run_cli(["check", "--offline", "-f", spec,
                      "-f", f"tcp://{second.format(port)}=127.0.0.1:2"])
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"is already used by '{spec}'" in result.stderr, result.stderr


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6 in this Python")
def test_ipv4_and_ipv6_wildcards_split_the_families() -> None:
    # [::] is every IPv6 address only (nginx's ipv6only=on); 0.0.0.0 every IPv4 address.
    v4_backend, v6_backend = EchoServer(), EchoServer()
    port = free_port()
    proc = PortproxyProcess(["run", "--admin-address", "none",
                             "-f", f"tcp://0.0.0.0:{port}=127.0.0.1:{v4_backend.port}",
                             "-f", f"tcp://[::]:{port}=127.0.0.1:{v6_backend.port}"])
    try:
        proc.wait_for_line(f"listening on tcp 0.0.0.0:{port}")
        proc.wait_for_line(f"listening on tcp [::]:{port}")
        for host, payload in (("127.0.0.1", b"over ipv4"), ("::1", b"over ipv6")):
            with socket.create_connection((host, port), timeout=10) as client:
                client.sendall(payload)
                client.shutdown(socket.SHUT_WR)
                assert recv_all(client) == payload
        assert (v4_backend.accepted, v6_backend.accepted) == (1, 1)
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()
        v4_backend.close()
        v6_backend.close()


def test_a_reload_may_move_a_forward_to_the_same_address_spelt_otherwise(
        backend: EchoServer, tmp_path: Path) -> None:
    port = free_port()
    config = write(tmp_path / "c.toml", f'admin-address = "none"\nforwards = '
                   f'["tcp://lo/ipv4:{port}=127.0.0.1:{backend.port}"]\n')
    proc = PortproxyProcess(["run", "--config", str(config)])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{port}")
        write(config, f'admin-address = "none"\nforwards = '
              f'["tcp://127.0.0.1:{port}=127.0.0.1:{backend.port}"]\n')
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("reloaded: 0 unchanged, 1 added, 1 removed")
        proc.wait_for_line(f"forward tcp/127.0.0.1:{port}: listening on tcp 127.0.0.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(b"moved")
            assert client.recv(5, socket.MSG_WAITALL) == b"moved"
        assert "already served" not in proc.output
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.stop()


def test_a_replaced_forward_follows_a_second_reload_of_its_successor(tmp_path: Path) -> None:
    """The first reload's successor cannot resolve, so the original keeps accepting; a second
    reload replaces that successor by one that resolves: the original stops at once, rather
    than splitting clients with it until the hand-over times out."""
    first, second = EchoServer(), EchoServer()
    port = free_port()
    config = tmp_path / "c.toml"

    def configure(target: str) -> None:
        write(config, f'admin-address = "none"\n'
                      f'forwards = ["tcp://127.0.0.1:{port}={target},name=web"]\n')

    configure(f"127.0.0.1:{first.port}")
    proc = PortproxyProcess(["run", "--config", str(config)])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{port}")
        configure("no-such-host.invalid:80")
        proc.signal(signal.SIGHUP)
        proc.wait_for_line("accepting until its successor listens")
        configure(f"127.0.0.1:{second.port}")
        proc.signal(signal.SIGHUP)
        wait_for(lambda: proc.output.count("reloaded:") == 2, what="the second reload")

        def only_second() -> bool:
            before = first.accepted
            for i in range(20):
                assert exchange_once(port, b"%d" % i) == b"%d" % i
            return first.accepted == before

        wait_for(only_second, what="every client to reach the second target")
        proc.signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "stopping it anyway" not in proc.output
    finally:
        proc.stop()
        first.close()
        second.close()


def exchange_once(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(payload)
        client.shutdown(socket.SHUT_WR)
        return recv_all(client)


def test_listening_lines_name_the_address_and_carry_the_forward_field(
        backend: EchoServer) -> None:
    tcp, udp = free_port(), free_port()
    proc = PortproxyProcess(["run", "--log-format", "json", "--admin-address", "none",
                             "-f", f"tcp://127.0.0.1:{tcp}=127.0.0.1:{backend.port}",
                             "-f", f"udp://127.0.0.1:{udp}=127.0.0.1:{backend.port}"])
    try:
        proc.wait_for_line(f"listening on udp 127.0.0.1:{udp}")
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.stop()
    records = [json.loads(line) for line in proc.lines]
    stopped = {r["msg"]: r.get("forward") for r in records if "stopped listening" in r["msg"]}
    assert stopped == {
        f"forward tcp/127.0.0.1:{tcp}: stopped listening on tcp 127.0.0.1:{tcp}":
            f"tcp/127.0.0.1:{tcp}",
        f"forward udp/127.0.0.1:{udp}: stopped listening on udp 127.0.0.1:{udp}":
            f"udp/127.0.0.1:{udp}",
    }


def test_forwards_a_reload_removes_drain_by_the_timeout_it_sets(
        backend: EchoServer, tmp_path: Path) -> None:
    # The README lists drain-timeout among what a reload applies: the forwards the same
    # reload removes are the first to drain by it.
    keep, drop = free_port(), free_port()
    spec_keep = f"tcp://127.0.0.1:{keep}=127.0.0.1:{backend.port}"
    spec_drop = f"tcp://127.0.0.1:{drop}=127.0.0.1:{backend.port}"
    config = write(tmp_path / "c.toml", 'admin-address = "none"\ndrain-timeout = "1h"\n'
                   f'forwards = ["{spec_keep}", "{spec_drop}"]\n')
    proc = PortproxyProcess(["run", "--config", str(config), "--access-log"])
    try:
        proc.wait_for_line(f"listening on tcp 127.0.0.1:{drop}")
        with socket.create_connection(("127.0.0.1", drop), timeout=10) as on_dropped:
            on_dropped.sendall(b"open")
            assert on_dropped.recv(4, socket.MSG_WAITALL) == b"open"
            write(config, 'admin-address = "none"\ndrain-timeout = "200ms"\n'
                  f'forwards = ["{spec_keep}"]\n')
            proc.signal(signal.SIGHUP)
            proc.wait_for_line("reloaded: 1 unchanged, 0 added, 1 removed")
            line = proc.wait_for_line("result=drain_timeout")
            assert f"forward=tcp/127.0.0.1:{drop}" in line
            with pytest.raises(ConnectionResetError):
                while on_dropped.recv(1):
                    pass
    finally:
        proc.stop()
