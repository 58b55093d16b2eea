"""Command line: the only place that turns errors into exit codes.

Exit codes: 0 clean stop, 2 invalid usage or config, 3 could not set up (bind, permission,
API access), 1 anything unexpected.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click

from portproxy import __version__
from portproxy.config import Settings
from portproxy.errors import ConfigError, SetupError
from portproxy.spec import ForwardOptions, parse_duration, parse_forward

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3
F = TypeVar("F", bound=Callable[..., Any])


class Duration(click.ParamType):  # type: ignore[type-arg]  # generic only in newer click
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float:
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(str(value))
        except ConfigError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


def env(flag: str) -> str:
    return "PORTPROXY_" + flag.upper().replace("-", "_")


def forward_options(command: F) -> F:
    """The flags shared by ``run`` and ``check`` (declared once, applied to both)."""
    decorators = [
        click.option("-f", "--forward", "forwards", multiple=True, envvar=env("forward"),
                     metavar="SPEC",
                     help="[PROTO://][ADDRESS:]PORT=TARGET[,KEY=VALUE...]; repeat per port. "
                          "PORTPROXY_FORWARD takes several, separated by whitespace."),
        click.option("--connect-timeout", type=DURATION, envvar=env("connect-timeout"),
                     default="5s", show_default=True,
                     help="Default backend connect timeout per endpoint."),
        click.option("--idle-timeout", type=DURATION, envvar=env("idle-timeout"), default=None,
                     help="Default idle timeout [TCP 1h, UDP 30s]; 0 disables."),
        click.option("--fin-timeout", type=DURATION, envvar=env("fin-timeout"), default="5m",
                     show_default=True,
                     help="Default bound on a half-closed TCP connection; 0 disables."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def daemon_options(command: F) -> F:
    decorators = [
        click.option("--drain-timeout", type=DURATION, envvar=env("drain-timeout"),
                     default="30s", show_default=True,
                     help="How long open connections may finish after SIGTERM/SIGINT."),
        click.option("--no-splice", is_flag=True, envvar=env("no-splice"),
                     help="Use the copy pump instead of zero-copy splice(2)."),
        click.option("--log-level", envvar=env("log-level"), default="info", show_default=True,
                     type=click.Choice(["debug", "info", "warning", "error"],
                                       case_sensitive=False),
                     help="Log verbosity."),
        click.option("--log-format", envvar=env("log-format"), default="text",
                     show_default=True, type=click.Choice(["text", "json"]),
                     help="Log line format."),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"portproxy: error: {message}", err=True)
    sys.exit(code)


def build_forwards(specs: Sequence[str], defaults: ForwardOptions) -> tuple[Any, ...]:
    if not specs:
        raise ConfigError("no forwards given: use -f/--forward SPEC (or PORTPROXY_FORWARD)")
    forwards = tuple(parse_forward(spec, defaults) for spec in specs)
    seen: dict[tuple[str, str, int], str] = {}
    for forward in forwards:
        for protocol in forward.protocols:
            key = (protocol.value, forward.listen.host, forward.listen.port)
            if key in seen:
                raise ConfigError(f"invalid --forward {forward.spec!r}: {protocol.value} "
                                  f"{forward.listen} is already used by {seen[key]!r}")
            seen[key] = forward.spec
    names = [f.name for f in forwards]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two forwards are named {name!r}; names must be unique")
    return forwards


def default_options(params: dict[str, Any]) -> ForwardOptions:
    return ForwardOptions(
        connect_timeout=params["connect_timeout"],
        idle_timeout=params["idle_timeout"],
        fin_timeout=params["fin_timeout"],
    )


def setup_logging(level: str, fmt: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_guarded(body: Callable[[], None]) -> NoReturn:
    """Run ``body`` and map the project's errors to exit codes (the only such place)."""
    try:
        body()
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except SetupError as exc:
        fail(str(exc), EXIT_SETUP)
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except Exception as exc:  # last resort: say what broke, exit 1
        logging.getLogger("portproxy").exception("unexpected error")
        fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_UNEXPECTED)
    sys.exit(EXIT_OK)


@click.group(context_settings={"help_option_names": ["-h", "--help"],
                               "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="portproxy",
                      message="%(prog)s %(version)s")
def main() -> None:
    """portproxy: bind any port and forward it (TCP, UDP) to an address or a Kubernetes
    Service."""


@main.command()
@forward_options
@daemon_options
def run(**params: Any) -> None:
    """Run the forwarder until SIGTERM/SIGINT."""

    def body() -> None:
        from portproxy.daemon import Daemon

        forwards = build_forwards(params["forwards"], default_options(params))
        settings = Settings(
            forwards=forwards,
            drain_timeout=params["drain_timeout"],
            use_splice=not params["no_splice"],
        )
        setup_logging(params["log_level"], params["log_format"])
        asyncio.run(Daemon(settings).run())

    run_guarded(body)
