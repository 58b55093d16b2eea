"""The project's exception hierarchy: every error says whose fault it was.

``ConfigError`` is the user's (bad flag, spec or file: exit 2); ``SetupError`` is the
environment's at start-up (port in use, permission, API access: exit 3); ``BackendError`` and
``ResolveError`` are the remote side's and are handled inside the engines.  Only ``cli.py``
turns these into exit codes.
"""


class PortproxyError(Exception):
    """Base class of every error raised on purpose by portproxy."""


class ConfigError(PortproxyError):
    """Invalid user input: a flag, a forward spec, a config file. Exit code 2."""


class SetupError(PortproxyError):
    """The environment refused what a valid config asked for: bind, permission, API. Exit 3."""


class BindError(SetupError):
    """A listen address could not be bound; ``errno`` says why (an interface binding treats
    EADDRNOTAVAIL as the address having just left, not as the user's mistake)."""

    def __init__(self, message: str, errno: int | None) -> None:
        super().__init__(message)
        self.errno = errno


class BackendError(PortproxyError):
    """A backend refused, timed out or broke a connection."""


class ResolveError(PortproxyError):
    """A target could not be resolved (DNS failure, missing Service, API refusal)."""
