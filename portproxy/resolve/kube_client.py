"""Helpers around the API client that need no ``kubernetes`` import: its errors.

Kept apart from ``kubernetes.py`` (the only importer of the client) so that module stays about
the client itself.
"""

from __future__ import annotations

from portproxy.errors import ResolveError, SetupError
from portproxy.resolve.kube_informer import ApiStatusError, Query, TransientError, problem_line


def check_error(exc: ApiStatusError | TransientError, verb: str, query: Query,
                host: str) -> Exception:
    """The error ``portproxy check`` raises for an API failure (RBAC/auth → SetupError)."""
    if isinstance(exc, ApiStatusError) and exc.code in (401, 403):
        return SetupError(problem_line(exc, verb, query, retrying=False))
    if isinstance(exc, TransientError):
        return ResolveError(f"cannot reach the Kubernetes API at {host}: {exc}")
    return ResolveError(problem_line(exc, verb, query, retrying=False))
