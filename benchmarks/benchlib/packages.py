"""Installing the peers from Debian packages when they are missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Requirement:
    """A program the harness needs, and the Debian packages that provide it."""

    name: str
    packages: tuple[str, ...]


REQUIREMENTS = (
    Requirement("gcc", ("gcc", "libc6-dev")),
    Requirement("iperf3", ("iperf3",)),
    Requirement("haproxy", ("haproxy",)),
    Requirement("socat", ("socat",)),
    Requirement("nginx", ("nginx-light", "libnginx-mod-stream")),
    Requirement("taskset", ("util-linux",)),
    Requirement("ip", ("iproute2",)),
)


def nginx_stream_module() -> Path | str | None:
    """How nginx gets its stream module: "builtin", a module file to load, or None (missing)."""
    nginx = shutil.which("nginx")
    if nginx is None:
        return None
    built = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
    if re.search(r"--with-stream(\s|$)", built):
        return "builtin"
    match = re.search(r"--modules-path=(\S+)", built)
    module = Path(match.group(1) if match else "/usr/lib/nginx/modules") / "ngx_stream_module.so"
    return module if module.exists() else None


def _present(req: Requirement) -> bool:
    if shutil.which(req.name) is None:
        return False
    return req.name != "nginx" or nginx_stream_module() is not None


def _apt_install(packages: list[str]) -> str | None:
    """apt-get install, retrying a bounded number of times while another install holds the lock."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    updated = False
    error = "not attempted"
    for _attempt in range(12):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode == 0:
            return None
        error = (proc.stderr.strip().splitlines() or ["apt-get failed"])[-1]
        if "lock" in proc.stderr.lower():
            time.sleep(5)
            continue
        if updated:
            break
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=900)
        updated = True
    return error


def ensure_installed(allow_install: bool) -> dict[str, str]:
    """Install what is missing; return {program: reason} for what is still unavailable."""
    missing = [req for req in REQUIREMENTS if not _present(req)]
    if missing and allow_install and shutil.which("apt-get") and os.geteuid() == 0:
        packages = sorted({pkg for req in missing for pkg in req.packages})
        print(f"installing missing packages: {' '.join(packages)}", flush=True)
        error = _apt_install(packages)
        if error:
            print(f"apt-get failed: {error}", flush=True)
    reasons = {}
    for req in REQUIREMENTS:
        if not _present(req):
            how = "not installed" if shutil.which(req.name) is None else "stream module missing"
            reasons[req.name] = f"{req.name} {how} (Debian: {' '.join(req.packages)})"
    return reasons
