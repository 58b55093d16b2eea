"""Command line: the only place that turns errors into exit codes.

Exit codes: 0 clean stop, 2 invalid usage or config, 3 could not set up (bind, permission,
API access), 1 anything unexpected. Every flag also reads ``PORTPROXY_<FLAG>`` from the
environment; ``--config`` supplies defaults, so precedence is flags > environment > file >
built-in defaults.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NoReturn, TypeVar

import click

from portproxy import __version__
from portproxy.cli_settings import settings_from
from portproxy.config import Settings
from portproxy.endpoints import BalancePolicy
from portproxy.errors import ConfigError, SetupError
from portproxy.spec import ProxyProtocol, TargetMode
from portproxy.spec_values import InvalidPart, allowlist, format_seconds, parse_duration

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3
#: ``ctx.meta`` key: the `run` flags a command invoking `run` stands for (reloads use them).
RUN_ARGS = "portproxy.run_args"
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


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config``: the file's values become defaults for every other flag."""
    if value is None:
        return None
    from portproxy.configfile import load_config_file

    options = _config_options()
    try:
        loaded = load_config_file(
            value, options, convert=lambda key, item: _config_value(key, options[key], item))
    except ConfigError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    defaults: dict[str, Any] = {str(options[key].name): item
                                for key, item in loaded.settings.items()}
    if loaded.forwards:
        defaults["forwards"] = list(loaded.forwards)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _config_options() -> dict[str, click.Option]:
    """Config-file key → option: the long flag without its dashes (``context`` for
    ``--context``, ``address`` for ``--address``). One file serves both `run` and `check`, so
    every flag of `run` is a valid key."""
    keys: dict[str, click.Option] = {}
    for option in run.params:
        if isinstance(option, click.Option) and option.name not in ("config", "forwards"):
            flag = next(opt for opt in option.opts if opt.startswith("--"))
            keys[flag.removeprefix("--")] = option
    return keys


def _config_value(key: str, option: click.Option, value: object) -> object:
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
            return tuple(_config_scalar(key, option, item) for item in value)
        else:
            raise ConfigError(f"{key}: expected a single value, not a list")
    converted = _config_scalar(key, option, value)
    return (converted,) if option.multiple else converted


def _config_scalar(key: str, option: click.Option, value: object) -> object:
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


def _options(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    def apply(command: F) -> F:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command
    return apply


forward_options = _options(
    option("-f", "--forward", "forwards", multiple=True, envvar=env("forward"),
                 metavar="SPEC",
                 help="[PROTO://][ADDRESS:]PORT=TARGET[,KEY=VALUE...]; repeat per port. "
                      "PORTPROXY_FORWARD takes several, separated by whitespace."),
    option("--config", type=click.Path(dir_okay=False), envvar=env("config"),
                 is_eager=True, callback=_load_config, expose_value=True,
                 help="TOML file with the same settings and a list of forwards."),
    option("--mode", type=click.Choice([m.value for m in TargetMode]),
                 envvar=env("mode"), default="endpoints", show_default=True,
                 help="Default for Service targets: pods from EndpointSlices, or the "
                      "ClusterIP."),
    option("--balance", type=click.Choice([b.value for b in BalancePolicy]),
                 envvar=env("balance"), default="round-robin", show_default=True,
                 help="Default balancing policy across endpoints."),
    option("--connect-timeout", type=POSITIVE_DURATION, envvar=env("connect-timeout"),
                 default="5s", show_default=True,
                 help="Default backend connect timeout per endpoint."),
    option("--idle-timeout", type=DURATION, envvar=env("idle-timeout"), default=None,
                 help="Default idle timeout [TCP 1h, UDP 30s]; 0 disables."),
    option("--fin-timeout", type=DURATION, envvar=env("fin-timeout"), default="5m",
                 show_default=True,
                 help="Default bound on a half-closed TCP connection; 0 disables."),
    option("--max-flows", type=Count(0), envvar=env("max-flows"),
                 default=10000, show_default=True,
                 help="Default UDP flows per forward (least recently used evicted); "
                      "0 = unlimited."),
    option("--responses", type=Count(0), envvar=env("responses"), default=0,
                 show_default=True,
                 help="Default UDP replies per client datagram after which a flow ends "
                      "(DNS: 1); 0 waits for the idle timeout."),
    option("--proxy-protocol", type=click.Choice([p.value for p in ProxyProtocol]),
                 envvar=env("proxy-protocol"), default=None,
                 help="Default PROXY protocol header sent to backends."),
    option("--allow", envvar=env("allow"), default=None, metavar="CIDR[;CIDR...]",
                 help="Default client allowlist (empty admits everyone)."),
    option("--wait-interface", is_flag=True, envvar=env("wait-interface"),
                 help="Default for interface listen addresses: the interface may appear "
                      "later."),
    option("--freebind", is_flag=True, envvar=env("freebind"),
                 help="Default for IP listen addresses: bind one this host does not have "
                      "yet (IP_FREEBIND)."),
    option("--kubeconfig", type=click.Path(dir_okay=False), envvar=env("kubeconfig"),
                 help="kubeconfig file; given (or --context), it is used even in a pod, "
                      "instead of the service account [KUBECONFIG, ~/.kube/config]."),
    option("--context", "kube_context", envvar=env("context"),
                 help="kubeconfig context to use."),
    option("--node-name", envvar=[env("node-name"), "NODE_NAME"],
                 help="This node's name, to prefer its endpoints [NODE_NAME]."),
    option("--tcp-services-configmap", envvar=env("tcp-services-configmap"),
                 metavar="NS/NAME",
                 help="Follow an ingress-nginx tcp-services ConfigMap (port → ns/svc:port)."),
    option("--udp-services-configmap", envvar=env("udp-services-configmap"),
                 metavar="NS/NAME",
                 help="Follow an ingress-nginx udp-services ConfigMap."),
)

daemon_options = _options(
    option("--admin-address", envvar=env("admin-address"), default=":9753",
                 show_default=True,
                 help="Serve /metrics /healthz /readyz /forwards here; 'none' disables."),
    option("--drain-timeout", type=DURATION, envvar=env("drain-timeout"),
                 default="30s", show_default=True,
                 help="How long open connections may finish after SIGTERM/SIGINT."),
    option("--no-splice", is_flag=True, envvar=env("no-splice"),
                 help="Use the copy pump instead of zero-copy splice(2)."),
    option("--workers", type=Count(1, 64), envvar=env("workers"), default=1,
                 show_default=True,
                 help="Processes sharing every listener (SO_REUSEPORT); one supervisor "
                      "keeps the API watches and the admin endpoint."),
    option("--max-conns", type=Count(0), envvar=env("max-conns"), default=0,
                 show_default=True,
                 help="TCP connections open at once across all forwards; 0 = unlimited."),
    option("--log-level", envvar=env("log-level"), default="info", show_default=True,
                 type=click.Choice(["debug", "info", "warning", "error"],
                                   case_sensitive=False),
                 help="Log verbosity."),
    option("--log-format", envvar=env("log-format"), default="text",
                 show_default=True, type=click.Choice(["text", "json"]),
                 help="Log line format."),
    option("--access-log", is_flag=True, envvar=env("access-log"),
                 help="Log one line per finished TCP connection / expired UDP flow."),
    option("--create-interface", envvar=env("create-interface"), metavar="NAME",
                 help="Create (or adopt) a dummy interface with the --address VIPs at start "
                      "and remove it on exit; needs NET_ADMIN."),
    option("--address", "addresses", multiple=True, envvar=env("address"),
                 metavar="CIDR", help="A VIP for --create-interface (repeatable)."),
)


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"portproxy: error: {message}", err=True)
    sys.exit(code)


def run_guarded(body: Callable[[], None]) -> NoReturn:
    """Run ``body`` and map the project's errors to exit codes (the only such place)."""
    try:
        body()
    except KeyboardInterrupt:
        sys.exit(EXIT_OK)
    except Exception as exc:
        cause = _sole_cause(exc)
        if isinstance(cause, ConfigError):
            fail(str(cause), EXIT_USAGE)
        if isinstance(cause, SetupError):
            fail(str(cause), EXIT_SETUP)
        # Last resort: say what broke, exit 1.
        logging.getLogger("portproxy").exception("unexpected error")
        fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_UNEXPECTED)
    sys.exit(EXIT_OK)


def _sole_cause(exc: Exception) -> Exception:
    """The one error inside (nested) task group wrappers: a SetupError raised by a task is
    still the user's one-line message and exit 3, not a traceback."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


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
@click.pass_context
def run(ctx: click.Context, /, **params: Any) -> None:
    """Run the forwarder until SIGTERM/SIGINT (SIGHUP re-reads --config)."""
    # The flags to re-read the file under on SIGHUP: this command's own argv, or what the
    # legacy argv stands for (its PORT SERVICE [TIMEOUT] are no `run` flags).
    args = ctx.meta.get(RUN_ARGS) or (list(sys.argv[2:]) if ctx.parent is not None else [])
    info_name = ctx.info_name or "run"

    def reload() -> Settings:
        """Re-read the config file under the same flags and environment."""
        try:
            with run.make_context(info_name, list(args), parent=ctx.parent) as fresh:
                return settings_from(fresh.params)
        except click.ClickException as exc:
            raise ConfigError(exc.format_message()) from None

    def body() -> None:
        from portproxy.daemon import Daemon
        from portproxy.logs import setup_logging

        settings = settings_from(params)
        from portproxy.loop import install_fast_loop

        limiter = setup_logging(params["log_level"], params["log_format"])
        install_fast_loop()
        reloader = reload if settings.config_file else None

        async def main_async() -> None:
            flusher = asyncio.create_task(limiter.flush_periodically(), name="log summaries")
            try:
                if settings.workers > 1:
                    from portproxy.workers import Supervisor

                    await Supervisor(settings, reloader).run()
                else:
                    await Daemon(settings, reloader=reloader).run()
            finally:
                flusher.cancel()
        try:
            asyncio.run(main_async())
        finally:
            limiter.flush(everything=True)  # say what the rate limit held back

    run_guarded(body)


@main.command()
@forward_options
@daemon_options
@option("--offline", is_flag=True, envvar=env("offline"),
              help="Parse and bind-test only; resolve nothing.")
def check(**params: Any) -> None:
    """Parse, bind-test and resolve every forward once; print a table.

    Takes every flag of `run` (so `run` can be swapped for `check` in any command line);
    daemon-only flags are validated and otherwise ignored. Exits 0 when everything would
    work at `run`, 2 for invalid input, 3 otherwise.
    """

    def body() -> None:
        from portproxy.logs import setup_logging

        settings = settings_from(params)
        # Warnings only (the table is the output), through portproxy's handler: without
        # one, a library's logging.error() would install Python's default handler, which
        # writes whatever it is given (setup_logging also redacts credential plugin output).
        setup_logging("warning", params["log_format"])
        rows = asyncio.run(_check_all(settings, params["offline"]))
        from portproxy.check import render

        click.echo(render(rows))
        if not all(row.ok for row in rows):
            raise SetupError("some forwards would fail at run (see STATUS above)")

    run_guarded(body)


async def _check_all(settings: Settings, offline: bool) -> list[Any]:
    from portproxy.check import BindTest, check_forward
    from portproxy.spec import ServiceTarget

    kube = None
    if not offline and any(isinstance(f.target, ServiceTarget) for f in settings.forwards):
        from portproxy.resolve.kubernetes import KubeResolvers, KubeSettings

        kube = KubeResolvers(KubeSettings(kubeconfig=settings.kubeconfig,
                                          context=settings.kube_context))
    binds = BindTest()
    try:
        return [await check_forward(f, offline, kube, binds) for f in settings.forwards]
    finally:
        binds.close()
        if kube is not None:
            await kube.close()


def legacy_spec(protocol: str, port: int, service: str, timeout: float | None,
                cluster: bool) -> str:
    """The old proxy-to-service image's argv as a forward spec.

    SERVICE is ``name.namespace[.svc[.cluster.local]]``: with a cluster config available it
    becomes the Service through the API (port matched by number), otherwise a DNS name.
    """
    parts = service.rstrip(".").split(".")
    is_service = cluster and len(parts) >= 2 and (len(parts) == 2 or parts[2] == "svc")
    target = f"{parts[1]}/{parts[0]}" if is_service else service
    spec = f"{protocol}://:{port}={target}:{port}"
    if timeout is not None:  # exact plain seconds: 1000000, not 1e+06
        spec += f",idle-timeout={format_seconds(timeout)}"
    if is_service:
        spec += ",mode=clusterip"
    return spec


def _cluster_config_available(kubeconfig: str | None, context: str | None,
                               serviceaccount_dir: str | None = None) -> bool:
    """Whether `run` would find a cluster config: by the rule it loads one with
    (``config_source``), a service account, or a kubeconfig file that exists (of a
    ``:``-separated list, any one: the client merges those that do). ``kubeconfig`` is
    ``--kubeconfig`` as `run` sees it (flag > PORTPROXY_KUBECONFIG > the config file)."""
    from portproxy.resolve.kubernetes import KubeSettings, config_source

    settings = KubeSettings(kubeconfig=kubeconfig, context=context)
    if serviceaccount_dir is not None:
        settings = replace(settings, serviceaccount_dir=serviceaccount_dir)
    in_cluster, path = config_source(settings)
    return in_cluster or any(os.path.exists(os.path.expanduser(p))
                             for p in path.split(os.pathsep) if p)


def _legacy(protocol: str) -> click.Command:
    @click.command(name=protocol, context_settings={"ignore_unknown_options": False})
    @click.argument("port", type=click.IntRange(1, 65535))
    @click.argument("service")
    @click.argument("timeout", type=Seconds(0), required=False)
    @click.pass_context
    def legacy(ctx: click.Context, /, port: int, service: str, timeout: float | None) -> None:
        # `run`'s settings from the environment (and PORTPROXY_CONFIG's file) decide, as for
        # `run`, which cluster config a Service target would use; the spec replaces any
        # forwards they give, as -f would.
        params = _run_defaults([])
        cluster = _cluster_config_available(params["kubeconfig"], params["kube_context"])
        spec = legacy_spec(protocol, port, service, timeout, cluster)
        ctx.meta[RUN_ARGS] = ["-f", spec]
        ctx.invoke(run, **{**params, "forwards": (spec,)})

    legacy.help = (f"Drop-in for the proxy-to-service image: forward {protocol} PORT to "
                   "SERVICE:PORT (TIMEOUT = idle timeout in seconds).")
    return legacy


def _run_defaults(args: list[str]) -> dict[str, Any]:
    with run.make_context("run", args) as ctx:
        return dict(ctx.params)


main.add_command(_legacy("tcp"))
main.add_command(_legacy("udp"))
