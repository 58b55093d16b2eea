"""LD_PRELOAD libraries that simulate a kernel's refusal for portproxy alone, built with the
system's C compiler (the test skips, saying why, when there is none)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def build_preload(tmp_path: Path, name: str, source: str, purpose: str) -> Path:
    """Compile ``source`` into ``tmp_path/name.so``; skip the test without a compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip(f"no C compiler to build the library {purpose}")
    code = tmp_path / f"{name}.c"
    code.write_text(source)
    library = tmp_path / f"{name}.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(code), "-ldl"],
                   check=True, capture_output=True, timeout=60)
    return library
