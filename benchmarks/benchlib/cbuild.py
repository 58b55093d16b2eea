"""Compiling the C echo server and load generator."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCES = Path(__file__).resolve().parent.parent / "c"
PROGRAMS = ("echo_server", "loadgen")


def build(build_dir: Path) -> dict[str, Path]:
    """Compile each program unless its binary is newer than its source; return their paths."""
    build_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name in PROGRAMS:
        src = SOURCES / f"{name}.c"
        binary = build_dir / name
        if not binary.exists() or binary.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary), str(src)],
                           check=True, timeout=120)
        out[name] = binary
    return out
