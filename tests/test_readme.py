"""The README's flag table and the CLI must not drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import click

from portproxy.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def cli_flags() -> set[str]:
    flags: set[str] = set()
    assert isinstance(main, click.Group)
    for command in main.commands.values():
        for param in command.params:
            if isinstance(param, click.Option):
                flags.update(opt for opt in param.opts if opt.startswith("--"))
    flags.discard("--help")
    return flags


def readme_flag_table() -> set[str]:
    text = README.read_text()
    section = text.split("### Flags", 1)[1].split("\n### ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return {flag for row in rows for flag in re.findall(r"`(--[a-z-]+)", row.split("|")[1])}


def test_every_flag_is_documented() -> None:
    missing = cli_flags() - readme_flag_table()
    assert not missing, f"flags missing from the README's flag table: {sorted(missing)}"


def test_every_documented_flag_exists() -> None:
    unknown = readme_flag_table() - cli_flags()
    assert not unknown, f"README documents flags the CLI does not have: {sorted(unknown)}"


def test_readme_gives_the_two_commands() -> None:
    text = README.read_text()
    assert "make demo" in text and "make test" in text
