"""Log formats, level handling, rate limiting with a fake clock, and the access log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from portproxy.errors import ConfigError
from portproxy.logs import (
    AccessLog,
    AccessRecord,
    RateLimit,
    RateLimiter,
    Suppressed,
    format_address,
    parse_level,
    setup_logging,
)

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging changes process-wide state; put it back whatever the test did."""
    root = logging.getLogger()
    names = ("portproxy", "portproxy.access", "urllib3")
    saved = (list(root.handlers), root.level, [logging.getLogger(n).level for n in names])
    try:
        yield
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for name, level in zip(names, saved[2], strict=True):
            logging.getLogger(name).setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def json_lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines(stream)]


def test_json_line_has_core_fields_then_extras() -> None:
    out = io.StringIO()
    setup_logging("info", "json", out)
    logging.getLogger("portproxy.tcp").info(
        "listener bound on %s", "*:80", extra={"forward": "web", "endpoint": "10.0.0.1:80",
                                              "added": ["10.0.0.2:80"]})
    [record] = json_lines(out)
    assert list(record) == ["ts", "level", "logger", "msg", "forward", "endpoint", "added"]
    assert TS.match(str(record["ts"]))
    assert record["level"] == "info"
    assert record["logger"] == "portproxy.tcp"
    assert record["msg"] == "listener bound on *:80"
    assert record["forward"] == "web"
    assert record["endpoint"] == "10.0.0.1:80"
    assert record["added"] == ["10.0.0.2:80"]


def test_json_keeps_one_line_per_record_and_carries_the_exception() -> None:
    out = io.StringIO()
    setup_logging("info", "json", out)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logging.getLogger("portproxy.x").exception("failed for\n%s", "caf\u00e9")
    [line] = lines(out)
    record = json.loads(line)
    assert record["msg"] == "failed for\ncaf\u00e9"
    assert record["level"] == "error"
    assert "ValueError: boom\nsecond line" in str(record["exc"])
    assert line.isascii()


def test_text_line_shape_with_quoted_extras() -> None:
    out = io.StringIO()
    setup_logging("INFO", "text", out)
    logging.getLogger("portproxy.kube").warning(
        "watch restarted", extra={"service": "kube-system/kube-dns", "reason": "410 Gone"})
    [line] = lines(out)
    ts, rest = line.split(" ", 1)
    assert TS.match(ts)
    assert rest == ('WARNING portproxy.kube: watch restarted service=kube-system/kube-dns '
                    'reason="410 Gone"')


def test_text_lines_cannot_be_forged_by_what_they_quote() -> None:
    # An API server's error message (or any text from outside) with a newline would
    # otherwise start a second line that looks like portproxy's own.
    out = io.StringIO()
    setup_logging("INFO", "text", out)
    forged = "denied\n2026-01-01T00:00:00.000Z INFO portproxy: all good \x1b[2J"
    logging.getLogger("portproxy.kube").warning("API said: %s", forged,
                                                extra={"detail": "a\x1bb"})
    [line] = lines(out)
    assert line.endswith("WARNING portproxy.kube: API said: denied\\n2026-01-01T00:00:00.000Z "
                         "INFO portproxy: all good \\x1b[2J detail=\"a\\u001bb\"")


def test_level_filters_portproxy_but_third_party_stays_at_warning() -> None:
    out = io.StringIO()
    setup_logging("debug", "json", out)
    logging.getLogger("portproxy.udp").debug("flow opened")
    logging.getLogger("urllib3").info("response body: secret-looking stuff")
    logging.getLogger("urllib3").warning("retrying")
    assert [(r["logger"], r["msg"]) for r in json_lines(out)] == [
        ("portproxy.udp", "flow opened"), ("urllib3", "retrying")]


def test_info_level_drops_debug() -> None:
    out = io.StringIO()
    setup_logging("warning", "text", out)
    logging.getLogger("portproxy.udp").info("hidden")
    logging.getLogger("portproxy.udp").error("shown")
    assert [line.split(" ", 1)[1] for line in lines(out)] == ["ERROR portproxy.udp: shown"]


def test_setting_up_twice_replaces_the_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "text", first)
    setup_logging("info", "json", second)
    logging.getLogger("portproxy").info("once")
    assert first.getvalue() == ""
    assert [r["msg"] for r in json_lines(second)] == ["once"]


@pytest.mark.parametrize("name", ["verbose", "", "trace"])
def test_bad_level_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        setup_logging(name, "text", io.StringIO())
    assert str(info.value) == (
        f"invalid --log-level {name!r}: use one of debug, info, warning, error, critical")


def test_bad_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        setup_logging("info", "yaml", io.StringIO())  # type: ignore[arg-type]
    assert str(info.value) == "invalid --log-format 'yaml': use text or json"


def test_level_names_in_any_case() -> None:
    assert parse_level("Debug") == logging.DEBUG
    assert parse_level(" warn ") == logging.WARNING


def test_rate_limiter_allows_a_burst_then_counts() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(burst=3, interval=10.0), clock)
    verdicts = [limiter.admit("k", f"m{i}") for i in range(5)]
    assert [v.allowed for v in verdicts] == [True, True, True, False, False]
    assert all(v.closed == () for v in verdicts)
    clock.now += 9.999
    assert limiter.admit("k", "m5").allowed is False
    clock.now += 0.001
    verdict = limiter.admit("k", "m6")
    assert verdict.allowed is True
    assert verdict.closed == (Suppressed("k", "m0", 3),)


def test_rate_limiter_keys_are_independent() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(burst=1, interval=10.0), clock)
    assert limiter.admit("a", "a").allowed
    assert not limiter.admit("a", "a").allowed
    assert limiter.admit("b", "b").allowed


def test_rate_limiter_sweeps_ended_windows_of_other_keys() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(burst=1, interval=10.0), clock)
    limiter.admit("a", "first a")
    limiter.admit("a", "second a")
    clock.now += 10.0
    assert limiter.admit("b", "b").closed == (Suppressed("a", "first a", 1),)
    assert limiter.flush(everything=True) == []


def test_rate_limiter_bounds_its_keys_and_reports_what_it_evicts() -> None:
    clock = FakeClock()
    limiter = RateLimiter(RateLimit(burst=1, interval=10.0, max_keys=2), clock)
    limiter.admit("a", "a")
    limiter.admit("a", "a")
    clock.now += 1
    limiter.admit("b", "b")
    verdict = limiter.admit("c", "c")
    assert verdict.allowed
    assert verdict.closed == (Suppressed("a", "a", 1),)
    # 'a' was forgotten, so it starts a fresh window and passes again.
    assert limiter.admit("a", "a").allowed


def test_filter_writes_burst_then_a_summary_line() -> None:
    clock = FakeClock()
    out = io.StringIO()
    setup_logging("info", "json", out, rate_limit=RateLimit(burst=2, interval=60.0), clock=clock)
    log = logging.getLogger("portproxy.tcp")
    for i in range(5):
        log.error("connect to %s failed", f"10.0.0.{i}:80", extra={"forward": "web"})
    log.info("not limited")
    log.info("not limited")
    clock.now += 60.0
    log.error("connect to %s failed", "10.0.0.9:80")
    assert [(r["level"], r["msg"], r.get("suppressed")) for r in json_lines(out)] == [
        ("error", "connect to 10.0.0.0:80 failed", None),
        ("error", "connect to 10.0.0.1:80 failed", None),
        ("info", "not limited", None),
        ("info", "not limited", None),
        ("warning", "suppressed 3 similar messages like: connect to 10.0.0.0:80 failed", 3),
        ("error", "connect to 10.0.0.9:80 failed", None),
    ]
    assert json_lines(out)[4]["logger"] == "portproxy.tcp"


def test_a_flood_on_one_forward_does_not_silence_another() -> None:
    clock = FakeClock()
    out = io.StringIO()
    limiter = setup_logging(
        "info", "json", out, rate_limit=RateLimit(burst=2, interval=60.0), clock=clock)
    log = logging.getLogger("portproxy.tcp")
    for forward in ("a", "a", "a", "a", "b"):
        log.warning("forward %s: backend failed", forward, extra={"forward": forward})
    limiter.flush(everything=True)
    assert [(r["msg"], r.get("forward")) for r in json_lines(out)] == [
        ("forward a: backend failed", "a"),
        ("forward a: backend failed", "a"),
        ("forward b: backend failed", "b"),
        ("suppressed 2 similar messages like: forward a: backend failed", None),
    ]


def test_filter_key_can_be_given_explicitly_and_flushed_at_shutdown() -> None:
    clock = FakeClock()
    out = io.StringIO()
    limiter = setup_logging(
        "info", "text", out, rate_limit=RateLimit(burst=1, interval=60.0), clock=clock)
    log = logging.getLogger("portproxy.udp")
    for text in ("refused", "unreachable", "timeout"):
        log.warning("backend %s", text, extra={"ratelimit_key": "backend-web"})
    limiter.flush()
    assert len(lines(out)) == 1  # the window has not ended yet
    limiter.flush(everything=True)
    assert [line.split(" ", 1)[1] for line in lines(out)] == [
        "WARNING portproxy.udp: backend refused",
        "WARNING portproxy: suppressed 2 similar messages like: backend refused suppressed=2",
    ]


def access_record(**changes: object) -> AccessRecord:
    values: dict[str, object] = {
        "protocol": "tcp", "forward": "tcp/*:80", "client": "[2001:db8::7]:40000",
        "endpoint": "10.1.2.3:8080", "bytes_up": 123, "bytes_down": 45678,
        "duration": 1.23456, "result": "ok",
    }
    values.update(changes)
    return AccessRecord(**values)  # type: ignore[arg-type]


def test_access_log_json_shape_even_at_warning_level() -> None:
    out = io.StringIO()
    setup_logging("warning", "json", out)
    access = AccessLog(enabled=True)
    access.record(access_record())
    access.record(access_record(protocol="udp", endpoint="", bytes_down=0, result="expired"))
    first, second = json_lines(out)
    del first["ts"], second["ts"]
    assert first == {
        "level": "info", "logger": "portproxy.access", "msg": "tcp connection closed",
        "forward": "tcp/*:80", "client": "[2001:db8::7]:40000", "endpoint": "10.1.2.3:8080",
        "bytes_up": 123, "bytes_down": 45678, "duration": 1.235, "result": "ok",
    }
    assert second["msg"] == "udp flow closed"
    assert second["endpoint"] == ""
    assert second["result"] == "expired"


def test_access_log_text_shape() -> None:
    out = io.StringIO()
    setup_logging("info", "text", out)
    AccessLog(enabled=True).record(access_record(client="10.0.0.5:40000", result="refused"))
    [line] = lines(out)
    assert line.split(" ", 1)[1] == (
        "INFO portproxy.access: tcp connection closed forward=tcp/*:80 client=10.0.0.5:40000 "
        "endpoint=10.1.2.3:8080 bytes_up=123 bytes_down=45678 duration=1.235 result=refused")


def test_disabled_access_log_writes_nothing() -> None:
    out = io.StringIO()
    setup_logging("debug", "text", out)
    AccessLog(enabled=False).record(access_record())
    assert out.getvalue() == ""


def test_format_address() -> None:
    assert format_address(("10.0.0.1", 80)) == "10.0.0.1:80"
    assert format_address(("2001:db8::1", 443, 0, 0)) == "[2001:db8::1]:443"


def test_rate_limited_logging_from_two_threads_never_raises() -> None:
    """Kubernetes watch threads warn beside the event loop. Windows that end on every call
    and a thread switch every microsecond make two threads close the same window at once;
    log.warning() must not raise for it (bounded: 2 threads x 5,000 calls)."""
    import sys
    import threading

    setup_logging("info", "text", io.StringIO(), rate_limit=RateLimit(interval=1e-9))
    log = logging.getLogger("portproxy.test.threads")
    errors: list[str] = []

    def warn_often() -> None:
        for _ in range(5000):
            try:
                log.warning("%s", "watch failed")
            except Exception as exc:  # what must not happen: collected, asserted below
                errors.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=warn_often) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        sys.setswitchinterval(interval)
        setup_logging("info", "text", io.StringIO())
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []


def test_a_storm_s_summary_is_written_without_a_further_warning() -> None:
    stream = io.StringIO()
    limiter = setup_logging("info", "text", stream,
                            rate_limit=RateLimit(burst=1, interval=0.05))
    log = logging.getLogger("portproxy.test.storm")
    try:
        for _ in range(3):
            log.warning("backend down")  # one written, two held back; then silence

        async def scenario() -> None:
            flusher = asyncio.create_task(limiter.flush_periodically())
            try:
                async with asyncio.timeout(5):
                    while "suppressed 2 similar messages" not in stream.getvalue():
                        await asyncio.sleep(0.01)
            finally:
                flusher.cancel()
        asyncio.run(scenario())
    finally:
        setup_logging("info", "text", io.StringIO())
    assert stream.getvalue().count("backend down") == 2  # the first, and the summary's sample
