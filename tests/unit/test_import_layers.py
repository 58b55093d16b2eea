"""Import layers: each third-party library has one owner module; the pure core does no I/O.

Imports only point downward: pure core → OS adapters → engines → composition root → CLI.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "portproxy"

OWNERS = {
    "kubernetes": {"resolve/kubernetes.py"},
    "urllib3": {"resolve/kubernetes.py"},
    "pyroute2": {"netlink.py"},
    "click": {"cli.py", "cli_params.py"},
}
PURE = ["spec.py", "spec_values.py", "endpoints.py", "flowtable.py", "proxyproto.py", "metrics.py",
        "configmap.py", "status.py", "errors.py", "endpointslices.py"]
IO_MODULES = {"socket", "asyncio", "os", "subprocess", "selectors", "threading", "select",
              "fcntl", "urllib", "http", "ssl", "signal"}
#: Modules that may only be imported by the layers above them.
UPPER = {"portproxy.cli": {"__main__.py"}, "portproxy.cli_settings": {"cli.py"},
         "portproxy.cli_params": {"cli.py"},
         "portproxy.daemon": {"cli.py", "workers.py", "worker_process.py"},
         "portproxy.workers": {"cli.py"},
         "portproxy.worker_process": set(),  # a process entry point (python -m), never imported
         # netlink.py's own parts: everything else reaches the kernel through its API.
         "portproxy.netlink_events": {"netlink.py"}, "portproxy.netlink_runner": {"netlink.py"}}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@functools.cache
def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(PACKAGE)): imports_of(p) for p in PACKAGE.rglob("*.py")}


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_each_library_has_one_owner(library: str) -> None:
    users = {name for name, imported in modules().items()
             if any(i == library or i.startswith(library + ".") for i in imported)}
    assert users <= OWNERS[library], f"{library} imported outside its owner: {users}"


@pytest.mark.parametrize("module", PURE)
def test_pure_core_does_no_io(module: str) -> None:
    imported = {name.split(".")[0] for name in modules()[module]}
    if module == "proxyproto.py":
        imported.discard("socket")  # inet_pton/inet_ntop: conversions, no I/O
    assert not imported & IO_MODULES, f"{module} imports {imported & IO_MODULES}"


@pytest.mark.parametrize("upper", sorted(UPPER))
def test_nothing_imports_upper_layers(upper: str) -> None:
    users = {name for name, imported in modules().items() if upper in imported}
    assert users <= UPPER[upper], f"{upper} imported from below: {users - UPPER[upper]}"


def test_only_the_cli_exits() -> None:
    for name, _ in modules().items():
        text = (PACKAGE / name).read_text()
        if name not in ("cli.py", "worker_process.py", "__main__.py"):
            assert "sys.exit(" not in text, f"{name} calls sys.exit"
