"""Compiling the C echo server and load generator."""

from __future__ import annotations

import os
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
            # Build beside and rename: a concurrent run never executes a half-written binary.
            partial = build_dir / f".{name}.{os.getpid()}"
            subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(partial), str(src)],
                           check=True, timeout=120)
            os.replace(partial, binary)
        out[name] = binary
    return out
