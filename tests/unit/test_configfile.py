"""The TOML config file: both forward forms, typed settings, and errors with positions."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from portproxy.config import RESTART_ONLY, Settings, keep_restart_only
from portproxy.configfile import ConfigFile, load_config_file, parse_config_text
from portproxy.errors import ConfigError
from portproxy.spec import parse_forward

ALLOWED = ("drain-timeout", "admin-address", "log-format", "workers", "no-splice",
           "address", "max-conns")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "portproxy.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_valid_file_with_both_forward_forms_and_typed_settings(tmp_path: Path) -> None:
    path = write(tmp_path, """\
# settings keep their TOML types
drain-timeout = "30s"
admin-address = ":9753"
workers = 2
no-splice = true
address = ["10.96.0.10/32", "fd00::10/128"]
forwards = ["tcp+udp://:53=kube-system/kube-dns:dns", "udp://0.0.0.0:5353=10.0.0.10:53"]

[[forward]]
proxy-protocol = "v2"
spec = "tcp://:80=web/frontend:http"
balance = "least-conn"

[[forward]]
spec = "tcp://eth0:2222=db.internal:22"
idle-timeout = 90
connect-timeout = 0.5
max-conns = 100
allow = ["10.0.0.0/8", "fd00::/8"]
wait-interface = true
name = "ssh"
""")
    config = load_config_file(path, ALLOWED)
    assert config == ConfigFile(
        settings=config.settings,
        forwards=(
            "tcp+udp://:53=kube-system/kube-dns:dns",
            "udp://0.0.0.0:5353=10.0.0.10:53",
            "tcp://:80=web/frontend:http,balance=least-conn,proxy-protocol=v2",
            "tcp://eth0:2222=db.internal:22,connect-timeout=0.5,idle-timeout=90,max-conns=100,"
            "allow=10.0.0.0/8;fd00::/8,wait-interface=true,name=ssh",
        ),
    )
    assert dict(config.settings) == {
        "drain-timeout": "30s", "admin-address": ":9753", "workers": 2, "no-splice": True,
        "address": ["10.96.0.10/32", "fd00::10/128"],
    }
    ssh = parse_forward(config.forwards[3])
    assert ssh.options.idle_timeout == 90.0
    assert ssh.options.connect_timeout == 0.5
    assert [str(n) for n in ssh.options.allow] == ["10.0.0.0/8", "fd00::/8"]
    assert ssh.options.wait_interface is True
    assert ssh.name == "ssh"


def test_settings_are_read_only(tmp_path: Path) -> None:
    config = load_config_file(write(tmp_path, 'workers = 3\n'), ALLOWED)
    with pytest.raises(TypeError):
        config.settings["workers"] = 4  # type: ignore[index]


def test_allow_as_a_semicolon_string_and_false_wait_interface() -> None:
    config = parse_config_text(
        '[[forward]]\nspec = "udp://:53=10.0.0.10:53"\nallow = "10.0.0.0/8;192.168.0.0/16"\n'
        'idle-timeout = "2s"\n', ALLOWED)
    assert config.forwards == ("udp://:53=10.0.0.10:53,idle-timeout=2s,"
                               "allow=10.0.0.0/8;192.168.0.0/16",)


def test_empty_file_is_empty_config(tmp_path: Path) -> None:
    assert load_config_file(write(tmp_path, ""), ALLOWED) == ConfigFile({}, ())


def test_unknown_top_level_key_names_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 2\n\n# comment\ndrain_timeout = "30s"\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path, ALLOWED)
    message = str(info.value)
    assert f"config file {path}, line 4: unknown key 'drain_timeout'" in message
    assert "did you mean 'drain-timeout'?" in message


def test_unknown_key_in_the_second_forward_table_names_that_line() -> None:
    text = """\
[[forward]]
spec = "tcp://:80=10.0.0.1:80"
balance = "random"

[[forward]]
spec = "tcp://:81=10.0.0.1:81"
balance = "random"
max_conns = 5
"""
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, ALLOWED, source="f.toml")
    assert str(info.value).startswith(
        "config file f.toml, line 8: [[forward]] number 2: unknown key 'max_conns'")
    assert "did you mean 'max-conns'?" in str(info.value)


def test_unknown_top_level_table_is_reported_at_its_header() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text('workers = 1\n\n[server]\nport = 1\n', ALLOWED)
    assert ", line 3: unknown key 'server'" in str(info.value)


def test_lines_inside_multiline_strings_are_not_keys() -> None:
    text = 'forwards = ["tcp://:80=10.0.0.1:80"]\nlog-format = """\nbogus = 1\n"""\nbogus = 2\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, ("log-format",))
    assert ", line 5: unknown key 'bogus'" in str(info.value)


def test_bad_toml_carries_tomllib_position(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 2\ndrain-timeout = 30s\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(path, ALLOWED)
    message = str(info.value)
    assert message.startswith(f"config file {path} is not valid TOML: ")
    assert "line 2" in message


def test_bad_spec_inside_a_table_names_the_table_spec_and_line() -> None:
    text = """\
forwards = ["tcp://:53=10.0.0.1:53"]

[[forward]]
spec = "tcp://:80=web/frontend:http"
balance = "fastest"
"""
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, ALLOWED, source="p.toml")
    message = str(info.value)
    # The bad value's own line, not the table header's.
    assert message.startswith(
        "config file p.toml, line 5: [[forward]] number 1 (spec 'tcp://:80=web/frontend:http'): ")
    assert "balance='fastest' is not one of" in message


def test_a_bad_spec_in_a_multi_line_forwards_list_names_its_own_line() -> None:
    text = ('forwards = [\n  "tcp://:53=10.0.0.1:53",\n  "tcp://:53=10.0.0.1:53",\n'
            '  "tcp://:99999=10.0.0.1:1",\n]\n')
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, ALLOWED, source="p.toml")
    assert str(info.value).startswith("config file p.toml, line 4: forwards[2]: ")


def test_a_bad_table_spec_names_the_spec_line() -> None:
    text = '[[forward]]\nname = "web"\nspec = "tcp://:99999=10.0.0.1:80"\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, ALLOWED, source="p.toml")
    assert str(info.value).startswith("config file p.toml, line 3: [[forward]] number 1 ")
    assert "port 99999 is out of range" in str(info.value)


def test_bad_spec_string_in_forwards_names_its_index_and_line() -> None:
    text = 'workers = 1\nforwards = ["tcp://:53=10.0.0.1:53", "tcp://:99999=10.0.0.1:1"]\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, ALLOWED, source="p.toml")
    message = str(info.value)
    assert message.startswith("config file p.toml, line 2: forwards[1]: ")
    assert "port 99999 is out of range" in message


@pytest.mark.parametrize(("line", "why"), [
    ('balance = "random,max-conns=1"', "balance = 'random,max-conns=1' is not a usable value"),
    ("max-conns = [1, 2]", "max-conns = [1, 2] is not a usable value"),
    ("name = true", "name = True is not a usable value"),
    # A whole number is a TOML integer, as for the top-level settings.
    ("max-conns = 2.0", "max-conns = 2.0 is not a usable value"),
])
def test_option_values_that_cannot_be_spec_text_are_rejected(line: str, why: str) -> None:
    text = f'[[forward]]\nspec = "tcp://:80=10.0.0.1:80"\n{line}\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, ALLOWED, source="p.toml")
    assert str(info.value) == (
        f"config file p.toml, line 3: [[forward]] number 1 (spec 'tcp://:80=10.0.0.1:80'): {why}")


def test_float_durations_are_read_exactly() -> None:
    # Rounded to 6 places, 1e-07 was 0: for idle-timeout, "never" instead of "at once".
    text = ('[[forward]]\nspec = "tcp://:80=10.0.0.1:80"\nidle-timeout = 0.0000001\n'
            'connect-timeout = 2.5\n')
    [spec] = parse_config_text(text, ALLOWED, source="p.toml").forwards
    assert spec == "tcp://:80=10.0.0.1:80,connect-timeout=2.5,idle-timeout=0.0000001"


def test_negative_duration_is_rejected_by_the_spec_parser() -> None:
    text = '[[forward]]\nspec = "tcp://:80=10.0.0.1:80"\nidle-timeout = -0.5\n'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text, ALLOWED, source="p.toml")
    assert str(info.value) == (
        "config file p.toml, line 3: [[forward]] number 1 (spec 'tcp://:80=10.0.0.1:80'): "
        "invalid --forward 'tcp://:80=10.0.0.1:80,idle-timeout=-0.5': idle-timeout: invalid "
        "duration '-0.5': use a number with an optional unit ms, s, m or h (e.g. 500ms, 30s, "
        "5m, 1h)")


def test_table_without_spec_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text('[[forward]]\nbalance = "random"\n', ALLOWED, source="p.toml")
    assert str(info.value).startswith(
        'config file p.toml, line 1: [[forward]] number 1: needs spec = "')


def test_single_forward_table_is_rejected_with_a_hint() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text('[forward]\nspec = "tcp://:80=10.0.0.1:80"\n', ALLOWED, source="p.toml")
    assert str(info.value) == (
        "config file p.toml, line 1: forward: write forward tables as [[forward]] "
        "(an array of tables), not [forward]")


def test_setting_that_is_a_table_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_text('workers = 1\n[drain-timeout]\nx = 1\n', ALLOWED, source="p.toml")
    assert str(info.value) == (
        "config file p.toml, line 2: drain-timeout: expected a string, number, boolean or a "
        "list of them, got a table")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = str(tmp_path / "absent.toml")
    with pytest.raises(ConfigError) as info:
        load_config_file(path, ALLOWED)
    assert str(info.value) == f"cannot read config file {path}: No such file or directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 1\n")
    os.chmod(path, 0)
    with pytest.raises(ConfigError) as info:
        load_config_file(path, ALLOWED)
    assert str(info.value) == f"cannot read config file {path}: Permission denied"


def test_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_file(str(tmp_path), ALLOWED)
    assert str(info.value).startswith(f"cannot read config file {tmp_path}: ")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'log-format = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config_file(str(path), ALLOWED)
    assert str(info.value).startswith(f"config file {path} is not UTF-8 text: ")


def test_convert_checks_settings_and_its_errors_get_key_line() -> None:
    # The CLI passes each flag's own check as `convert`; its reason gets file and line.
    def convert(key: str, value: object) -> object:
        if key == "workers" and not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return [value] if key == "address" else value

    config = parse_config_text('address = "10.0.0.1/32"\nworkers = 2\n', ALLOWED,
                               convert=convert)
    assert dict(config.settings) == {"address": ["10.0.0.1/32"], "workers": 2}
    with pytest.raises(ConfigError) as info:
        parse_config_text('drain-timeout = "1s"\n\nworkers = 2.7\n', ALLOWED, source="c.toml",
                          convert=convert)
    assert str(info.value) == ("config file c.toml, line 3: workers: expected a whole number, "
                               "got 2.7")


def test_every_setting_is_either_reloaded_or_restart_only() -> None:
    # A new setting must be classified: otherwise a reload would apply it halfway (read by
    # code built after the reload) or drop it without a word.
    reloaded = {"forwards", "drain_timeout", "max_conns", "forward_defaults", "config_file"}
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert fields == reloaded | set(RESTART_ONLY)
    running = Settings(forwards=(), admin_address=("", 1), max_conns=5)
    new = Settings(forwards=(), admin_address=("", 2), max_conns=9, log_level="debug")
    kept, ignored = keep_restart_only(running, new)
    assert ignored == ["admin-address", "log-level"]
    assert (kept.admin_address, kept.log_level, kept.max_conns) == (("", 1), "info", 9)
