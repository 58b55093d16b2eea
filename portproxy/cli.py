"""Command line: the only place that turns errors into exit codes.

Exit codes: 0 clean stop, 2 invalid usage or config, 3 could not set up (bind, permission,
API access), 1 anything unexpected. Every flag also reads ``PORTPROXY_<FLAG>`` from the
environment; ``--config`` supplies defaults, so precedence is flags > environment > file >
built-in defaults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NoReturn

import click

from portproxy import __version__
from portproxy.cli_params import (
    DURATION,
    POSITIVE_DURATION,
    Count,
    F,
    Seconds,
    config_value,
    env,
    option,
)
from portproxy.cli_settings import settings_from
from portproxy.config import Settings
from portproxy.endpoints import BalancePolicy
from portproxy.errors import ConfigError, SetupError
from portproxy.spec import ProxyProtocol, TargetMode
from portproxy.spec_values import format_seconds

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_SETUP = 0, 1, 2, 3
#: ``ctx.meta`` key: the `run` flags a command invoking `run` stands for (reloads use them).
RUN_ARGS = "portproxy.run_args"


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Eager ``--config``: the file's values become defaults for every other flag."""
    if value is None:
        return None
    from portproxy.configfile import load_config_file

    options = _config_options()
    try:
        loaded = load_config_file(
            value, options, convert=lambda key, item: config_value(key, options[key], item))
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
    for param in run.params:
        if isinstance(param, click.Option) and param.name not in ("config", "forwards"):
            flag = next(opt for opt in param.opts if opt.startswith("--"))
            keys[flag.removeprefix("--")] = param
    return keys


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
    option("--ready-file", envvar=env("ready-file"), metavar="PATH",
           help="A file that exists exactly while ready, for an exec readiness probe "
                "(test -e PATH): on the host network the admin port is shared by the pods "
                "of a rollout."),
    option("--create-interface", envvar=env("create-interface"), metavar="NAME",
                 help="Create (or adopt) a dummy interface with the --address VIPs at start "
                      "and remove it on exit; needs NET_ADMIN."),
    option("--address", "addresses", multiple=True, envvar=env("address"),
                 metavar="CIDR", help="A VIP for --create-interface (repeatable)."),
)


def fail(message: str, code: int) -> NoReturn:
    try:
        click.echo(f"portproxy: error: {message}", err=True)
    except OSError:  # stderr is a closed pipe: the exit code is all that can be said
        silence_output()
    sys.exit(code)


def silence_output() -> None:
    """Point stdout and stderr at /dev/null after a write to them failed (a closed pipe),
    so that the interpreter's last flush cannot fail too and turn the exit code into 120."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            os.dup2(devnull, stream.fileno())
    os.close(devnull)


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

        try:
            click.echo(render(rows))
        except OSError:  # stdout is a closed pipe: the exit code still tells
            silence_output()
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
    binds = BindTest(created=settings.create_interface)
    try:
        return [await check_forward(f, offline, kube, binds) for f in settings.forwards]
    finally:
        if kube is not None:
            await kube.close()


def legacy_spec(protocol: str, port: int, service: str, timeout: float | None,
                cluster: bool) -> str:
    """The old proxy-to-service image's argv as a forward spec.

    SERVICE is ``name.namespace[.svc[.cluster.local]]``: with a cluster config available it
    becomes the Service through the API (port matched by number), otherwise a DNS name. A
    trailing dot marks an absolute DNS name (``example.com.``), never a Service: the old
    image's DNS lookup found a Service first and the outside name only failing that, which
    one reading cannot do.
    """
    parts = service.rstrip(".").split(".")
    is_service = cluster and not service.endswith(".") and len(parts) >= 2 and (
        len(parts) == 2 or parts[2] == "svc")
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
