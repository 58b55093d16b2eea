"""What the numbers were measured on: CPU, kernel and the peers' versions."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .settings import Settings


def _first_line(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    out = (proc.stdout + proc.stderr).strip().splitlines()
    return out[0] if out and proc.returncode == 0 else "not available"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe(settings: Settings, repo: Path) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()} × {os.cpu_count()}",
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "mode": "quick" if settings.quick else "full",
        "repeats": settings.repeats,
        "durations": settings.describe_durations(),
        "pinning": (f"forwarder on CPU {settings.pin[0]}, load generator and backends on CPU "
                    f"{settings.pin[1]}" if settings.pin else "off"),
        "haproxy": _first_line(["haproxy", "-v"]),
        "nginx": _first_line(["nginx", "-v"]),
        "socat": _socat_version(),
        "iperf3": _first_line(["iperf3", "-v"]),
        "portproxy": _first_line([sys.executable, "-m", "portproxy", "--version"], cwd=repo),
    }


def _socat_version() -> str:
    try:
        out = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    for line in out.splitlines():
        if line.startswith("socat version"):
            return line
    return "not available"
