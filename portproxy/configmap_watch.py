"""Following ingress-nginx-style ConfigMaps through the API and applying them live."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from portproxy.configmap import ConfigMapRef, ForwardSources, configmap_forwards
from portproxy.spec import ForwardOptions

log = logging.getLogger("portproxy.configmap")


async def follow_configmap(ref: ConfigMapRef, kube: Any, defaults: ForwardOptions,
                           sources: ForwardSources, apply: Callable[[], None]) -> None:
    """Each change of the ConfigMap becomes a new set of forwards, applied with ``apply``
    (the same no-drop rule as SIGHUP: unchanged entries keep their connections)."""
    async for data in kube.watch_configmap(ref.namespace, ref.name):
        forwards, problems = configmap_forwards(ref, data, defaults)
        problems += sources.set_dynamic(ref, forwards)
        for problem in problems:
            log.error("%s", problem)
        log.info("%s: %d entr%s", ref, len(sources.dynamic[ref]),
                 "y" if len(sources.dynamic[ref]) == 1 else "ies")
        apply()
