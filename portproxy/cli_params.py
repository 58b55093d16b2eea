"""The flags' value types, and config-file values checked as the flags' would be.

Every flag reads ``PORTPROXY_<FLAG>`` (``env``); ``option`` declares one with ``EnvOption``,
whose errors name the variable when the value came from it. Config-file values go through
the same types (``config_value``), so ``idle-timeout = "inf"`` fails like ``--idle-timeout
inf`` does, with the file's key and line added by the caller.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from portproxy.errors import ConfigError
from portproxy.spec_values import InvalidPart, allowlist, parse_duration

F = TypeVar("F", bound=Callable[..., Any])


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    """A duration flag, and its config-file key (where a TOML number means seconds): the
    text of the spec option, finite and >= 0; ``allow_zero`` as for the spec option."""

    name = "duration"

    def __init__(self, allow_zero: bool = True) -> None:
        self.allow_zero = allow_zero

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float:
        if isinstance(value, bool):
            self.fail(f"expected a duration (e.g. 500ms, 30s, 5m, 1h), got {value!r}",
                      param, ctx)
        if isinstance(value, int | float):
            try:
                seconds = float(value)
            except OverflowError:  # a TOML integer beyond any float
                seconds = math.inf
            if not (math.isfinite(seconds) and seconds >= 0):
                self.fail(f"invalid duration {value!r}: use a finite number of seconds >= 0 "
                          "or a string with a unit (e.g. \"500ms\", \"30s\")", param, ctx)
        else:
            try:
                seconds = parse_duration(str(value))
            except ConfigError as exc:
                self.fail(str(exc), param, ctx)
        if seconds == 0 and not self.allow_zero:
            self.fail("must be greater than 0", param, ctx)
        return seconds


DURATION = Duration()
POSITIVE_DURATION = Duration(allow_zero=False)  # as the spec option connect-timeout


class Count(click.IntRange):
    """A whole-number flag. From the config file only a TOML integer (or its text): 1.9 is
    an error, not 1."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        if isinstance(value, bool | float):
            self.fail(f"expected a whole number, got {value!r}", param, ctx)
        return super().convert(value, param, ctx)


class Seconds(click.FloatRange):
    """The legacy TIMEOUT: seconds >= 0, finite (``inf``/``nan`` are no idle timeout)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> Any:
        seconds = super().convert(value, param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return seconds


def env(flag: str) -> str:
    return "PORTPROXY_" + flag.upper().replace("-", "_")


class EnvOption(click.Option):
    """An option whose error names the environment variable when the bad value came from
    one: "Invalid value for '--drain-timeout' (from $PORTPROXY_DRAIN_TIMEOUT): ..."."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = super().get_error_hint(ctx)
        if ctx is None or ctx.get_parameter_source(self.name or "") is not (
                click.core.ParameterSource.ENVIRONMENT):
            return hint
        names = [self.envvar] if isinstance(self.envvar, str) else list(self.envvar or ())
        used = next((name for name in names if os.environ.get(name)), None)
        return f"{hint} (from ${used})" if used else hint


def option(*decls: str, **attrs: Any) -> Callable[[F], F]:
    """``click.option`` with ``EnvOption``: every flag here reads an environment variable."""
    decorator: Callable[[F], F] = click.option(*decls, cls=EnvOption, **attrs)
    return decorator


def config_value(key: str, option: click.Option, value: object) -> object:
    """A config-file value checked as the flag's would be (durations, whole numbers, choices,
    CIDRs), in the form click takes as the flag's default. A list is the repeated flag
    (``address``), or for ``allow`` the ``;``-separated CIDRs. ConfigError says why, the
    caller where."""
    if isinstance(value, list):
        if option.name == "allow":
            if not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{key}: expected a list of CIDR strings")
            value = ";".join(item.strip() for item in value)
        elif option.multiple:
            return tuple(_scalar(key, option, item) for item in value)
        else:
            raise ConfigError(f"{key}: expected a single value, not a list")
    converted = _scalar(key, option, value)
    return (converted,) if option.multiple else converted


def _scalar(key: str, option: click.Option, value: object) -> object:
    if not (option.is_flag or isinstance(option.type, Duration | Count)):
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        value = str(value)  # as the flag would read it (admin-address = 9753)
    try:
        converted = option.type.convert(value, None, None)
    except click.BadParameter as exc:
        raise ConfigError(f"{key}: {exc.message}") from None
    # What cli_settings checks for the flags, checked here so the error has a line number.
    if option.name == "allow":
        try:
            allowlist(converted)
        except InvalidPart as exc:
            raise ConfigError(str(exc)) from None  # "allow: '…' is not a CIDR"
    elif option.name == "addresses":
        try:
            ipaddress.ip_interface(converted)
        except ValueError:
            raise ConfigError(f"{key}: {converted!r} is not an IP address or CIDR "
                              "(e.g. 169.254.20.10/32)") from None
    return converted
