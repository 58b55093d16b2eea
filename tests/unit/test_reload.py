"""What a reload (SIGHUP) applies, and what it says it leaves for a restart."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from portproxy.config import Settings
from portproxy.configmap import ForwardSources
from portproxy.daemon import reloaded
from portproxy.spec import ForwardOptions, parse_forward


def run_reload(running: Settings, new: Settings) -> Settings | None:
    return reloaded(lambda: new, ForwardSources(running.forwards), running)


def test_changed_defaults_with_configmaps_say_the_entries_keep_the_old(
        caplog: pytest.LogCaptureFixture) -> None:
    running = Settings(forwards=(parse_forward("80=a:1"),),
                       tcp_services_configmap="ingress/tcp-services")
    defaults = ForwardOptions(idle_timeout=5.0)
    new = replace(running, forwards=(parse_forward("80=a:1", defaults),),
                  forward_defaults=defaults)
    with caplog.at_level(logging.WARNING, logger="portproxy"):
        applied = run_reload(running, new)
    assert applied is not None and applied.forward_defaults == defaults
    assert applied.forwards[0].options.idle_timeout == 5.0  # the file's forwards take them
    assert any("ConfigMap entries keep those of the start" in r.getMessage()
               for r in caplog.records), caplog.text


def test_changed_defaults_without_configmaps_need_no_word(
        caplog: pytest.LogCaptureFixture) -> None:
    running = Settings(forwards=(parse_forward("80=a:1"),))
    new = replace(running, forward_defaults=ForwardOptions(idle_timeout=5.0))
    with caplog.at_level(logging.WARNING, logger="portproxy"):
        assert run_reload(running, new) is not None
    assert not caplog.records, caplog.text


def test_workers_verdict_on_a_reload() -> None:
    from portproxy.workers import verdict

    assert verdict(["", ""]) == ""
    assert verdict(["", "port taken"]) == ""  # the refusing one is restarted with it
    assert verdict([None, ""]) == ""
    assert verdict(["port taken", None]) == "reload refused by the workers: port taken"
    # Every worker exited or is draining ("stopping" is no refusal): nothing was tried.
    assert verdict([None, None]).startswith("reload not applied: no worker was running")
    assert verdict([]).startswith("reload not applied")
