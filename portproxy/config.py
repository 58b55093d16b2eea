"""Process-wide settings: the global flags of DESIGN §1 as one frozen object.

The CLI builds it (flags > environment > config file > defaults); the daemon only reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from portproxy.spec import Forward, ForwardOptions


@dataclass(frozen=True, slots=True)
class Settings:
    forwards: tuple[Forward, ...]
    drain_timeout: float = 30.0
    """Seconds open connections may take to finish after SIGTERM before they are reset.
    30 s matches Kubernetes' default terminationGracePeriodSeconds."""
    use_splice: bool = True
    """Use the zero-copy splice pump where the kernel allows it (``--no-splice`` turns it off)."""
    admin_address: tuple[str, int] | None = ("", 9753)
    """Where /metrics, /healthz, /readyz and /forwards are served; None disables."""
    max_conns: int = 0
    """TCP connections open at once across every forward; 0 is unlimited."""
    access_log: bool = False
    """Log one line per finished connection or expired flow."""
    workers: int = 1
    """Processes sharing every listener through SO_REUSEPORT."""
    kubeconfig: str | None = None
    kube_context: str | None = None
    node_name: str | None = None
    """This node's name (downward API NODE_NAME) to prefer node-local endpoints."""
    create_interface: str | None = None
    interface_addresses: tuple[str, ...] = ()
    tcp_services_configmap: str | None = None
    udp_services_configmap: str | None = None
    config_file: str | None = None
    forward_defaults: ForwardOptions = field(default_factory=ForwardOptions)
    """The global --KEY option defaults, for forwards created later (ConfigMap entries)."""
    log_level: str = "info"
    log_format: str = "text"
    ready_file: str | None = None
    """A file that exists exactly while the instance is ready (for an exec readiness probe)."""


#: Settings read once at start, by field, with the flag (and config-file key) that sets them.
#: A reload applies the rest: the forwards (with the option defaults), max-conns and the
#: drain timeout.
RESTART_ONLY: dict[str, str] = {
    "use_splice": "no-splice",
    "admin_address": "admin-address",
    "access_log": "access-log",
    "workers": "workers",
    "kubeconfig": "kubeconfig",
    "kube_context": "context",
    "node_name": "node-name",
    "create_interface": "create-interface",
    "interface_addresses": "address",
    "tcp_services_configmap": "tcp-services-configmap",
    "udp_services_configmap": "udp-services-configmap",
    "log_level": "log-level",
    "log_format": "log-format",
    "ready_file": "ready-file",
}


def keep_restart_only(running: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with every restart-only setting put back to its ``running`` value, and the
    flags of those that differed (what a reload must say it did not apply)."""
    changed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(running, name)]
    kept = replace(new, **{name: getattr(running, name) for name in RESTART_ONLY})
    return kept, [RESTART_ONLY[name] for name in changed]
