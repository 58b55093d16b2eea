"""``--config FILE``: a TOML file holding the global flags and the forwards.

Top-level keys are the global flag names without dashes (``drain-timeout = "30s"``). The
CLI checks each value as its flag's would be (``convert``: a duration, a whole number, a
CIDR...), so a bad one is reported with its key and line, then feeds the values to click as
defaults: the precedence flags > environment > file > defaults falls out of click. Forwards
come as spec strings (``forwards = ["tcp://:80=web/frontend:http"]``) and/or ``[[forward]]``
tables whose option keys are folded into one canonical spec string and parsed now, so a bad
forward is reported with its file position at load time rather than at bind time.

tomllib reports no positions for valid documents, so errors about unknown keys find their
line by scanning the text (``_Locator``): good enough for the files people write by hand.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from portproxy.errors import ConfigError
from portproxy.spec import OPTION_KEYS, parse_forward
from portproxy.spec_values import format_seconds

FORWARD_KEYS = ("forwards", "forward")
"""Top-level keys holding forwards: a spec string, or a list of spec strings and tables."""

_SCALARS = (str, int, float, bool)

Convert = Callable[[str, object], object]
"""``(key, TOML value)`` → the setting's value, checked; raises ConfigError saying why."""


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """What a config file says, before flags and environment are applied on top."""

    settings: Mapping[str, object]
    """Global flag name (``drain-timeout``) → its value: what ``convert`` made of the TOML
    value, or without one the TOML value (str, int, float, bool or list)."""
    forwards: tuple[str, ...]
    """Canonical spec strings, strings first in file order, then tables in file order."""


def load_config_file(path: str, allowed_keys: Collection[str],
                     convert: Convert | None = None) -> ConfigFile:
    """Read and validate ``path``; every problem is a ConfigError naming the file."""
    try:
        with open(path, "rb") as stream:
            raw = stream.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from None
    return parse_config_text(text, allowed_keys, source=path, convert=convert)


def parse_config_text(
    text: str, allowed_keys: Collection[str], source: str = "<config>",
    convert: Convert | None = None,
) -> ConfigFile:
    """Parse the TOML ``text`` of a config file; ``source`` names it in errors. ``convert``
    checks each setting's value; its ConfigError gets the file and the key's line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
    locator = _Locator(text, source)
    settings: dict[str, object] = {}
    strings: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        if key in FORWARD_KEYS:
            _collect_forwards(key, value, locator, strings, tables)
        elif key in allowed_keys:
            settings[key] = _setting(key, value, locator, convert)
        else:
            raise locator.error(
                None, key, f"unknown key {key!r}{_suggest(key, [*allowed_keys, *FORWARD_KEYS])}")
    return ConfigFile(MappingProxyType(settings), (*strings, *tables))


def _setting(key: str, value: object, locator: _Locator, convert: Convert | None) -> object:
    scalars = value if isinstance(value, list) else [value]
    if not all(isinstance(item, _SCALARS) for item in scalars):
        raise locator.error(None, key, f"{key}: expected a string, number, boolean or a list "
                            f"of them, got {_type_name(value)}")
    if convert is None:
        return value
    try:
        return convert(key, value)
    except ConfigError as exc:
        raise locator.error(None, key, str(exc)) from None


def _collect_forwards(
    key: str, value: object, locator: _Locator, strings: list[str], tables: list[str],
) -> None:
    if isinstance(value, dict):
        raise locator.error(None, key, f"{key}: write forward tables as [[{key}]] "
                            "(an array of tables), not [" + key + "]")
    items = value if isinstance(value, list) else [value]
    for index, item in enumerate(items):
        if isinstance(item, str):
            strings.append(_validated(item, locator.item_line(key, items, index),
                                      f"{key}[{index}]", locator))
        elif isinstance(item, dict):
            tables.append(_table_spec(key, index, item, locator))
        else:
            raise locator.error(None, key, f"{key}[{index}]: expected a spec string or a table, "
                                f"got {_type_name(item)}")


def _table_spec(key: str, index: int, table: dict[str, object], locator: _Locator) -> str:
    line = locator.table_line(key, index)
    where = f"[[{key}]] number {index + 1}"
    for name in table:
        if name != "spec" and name not in OPTION_KEYS:
            raise locator.error((key, index), name, f"{where}: unknown key {name!r}"
                                f"{_suggest(name, ['spec', *OPTION_KEYS])}", fallback=line)
    spec = table.get("spec")
    if not isinstance(spec, str):
        raise locator.error((key, index), "spec", f"{where}: needs spec = \"[PROTO://]"
                            "[ADDRESS:]PORT=TARGET\" (a string)", fallback=line)
    where_spec = f"{where} (spec {spec!r})"
    _validated(spec, locator.line((key, index), "spec") or line, where_spec, locator)
    parts = [spec.strip()]
    for name in OPTION_KEYS:  # canonical order, whatever the order in the file
        if name in table:
            text = _option_text(name, table[name])
            option_line = locator.line((key, index), name) or line
            if text is None:
                raise ConfigError(f"{locator.position(option_line)}: {where_spec}: {name} = "
                                  f"{table[name]!r} is not a usable value")
            # Alone with the spec first, so that a bad value is reported at its own line.
            _validated(f"{spec.strip()},{name}={text}", option_line, where_spec, locator)
            parts.append(f"{name}={text}")
    return _validated(",".join(parts), line, where_spec, locator)


def _option_text(name: str, value: object) -> str | None:
    """A TOML option value as spec text, or None when it cannot be one."""
    if isinstance(value, bool):
        # Only a switch takes a boolean; `name = true` is a typo, not a name.
        if name not in ("wait-interface", "freebind"):
            return None
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # Seconds, for a duration only (`max-conns = 2.0` is an error, as at the top
        # level), written exactly: rounding 1e-07 to 0 would turn a timeout into "never".
        if not name.endswith("-timeout"):
            return None
        if not math.isfinite(value) or value < 0:
            return repr(value)  # the spec parser says why that is no duration
        return format_seconds(value)
    if isinstance(value, list) and name == "allow":
        if not all(isinstance(item, str) for item in value):
            return None
        value = ";".join(item.strip() for item in value)
    if isinstance(value, str):
        # A ',' would smuggle in another option; whitespace cannot appear in a spec.
        if "," in value or any(ch.isspace() for ch in value):
            return None
        return value
    return None


def _validated(spec: str, line: int | None, where: str, locator: _Locator) -> str:
    try:
        parse_forward(spec)
    except ConfigError as exc:
        raise ConfigError(f"{locator.position(line)}: {where}: {exc}") from None
    return spec.strip()


def _suggest(word: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(sorted(known))})"


def _type_name(value: object) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


_HEADER = re.compile(r"^\s*(\[\[|\[)\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)")
_KEY = re.compile(r"^\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_-]+)\s*[=.]")

Table = tuple[str, int] | None
"""Where a key sits: top level (None), or ``(name, index)`` of the index-th ``[[name]]``
header (index -1 for a plain ``[name]`` table)."""


class _Locator:
    """Line numbers of keys and table headers, found by scanning the TOML text."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self._lines = text.splitlines()
        self._keys: dict[tuple[Table, str], int] = {}
        self._headers: dict[tuple[str, int], int] = {}
        self._scan(text)

    def item_line(self, key: str, items: list[object], index: int) -> int | None:
        """The line of string ``items[index]`` in a top-level ``key = [...]`` list that
        may span lines: where its text appears, after the items before it; else the key's."""
        number = self.line(None, key)
        if number is None:
            return None
        for item in items[:index + 1]:
            if not isinstance(item, str) or not item:
                continue
            found = next((n for n in range(number, len(self._lines) + 1)
                          if item in self._lines[n - 1]), None)
            if found is None:
                return self.line(None, key)
            number = found
        return number

    def _scan(self, text: str) -> None:
        table: Table = None
        counts: dict[str, int] = {}
        in_string = False
        for number, line in enumerate(text.splitlines(), start=1):
            if in_string:
                in_string = _toggles_multiline(line) != in_string
                continue
            header = _HEADER.match(line)
            if header:
                name = _unquote(header.group(2))
                index = -1
                if header.group(1) == "[[":
                    index = counts[name] = counts.get(name, -1) + 1
                table = (name, index)
                self._headers.setdefault(table, number)
                self._keys.setdefault((None, name), number)
                continue
            key = _KEY.match(line)
            if key:
                self._keys.setdefault((table, _unquote(key.group(1))), number)
            in_string = _toggles_multiline(line)

    def line(self, table: Table, key: str) -> int | None:
        return self._keys.get((table, key))

    def table_line(self, name: str, index: int) -> int | None:
        """The ``[[name]]`` header of item ``index``, else the line of ``name = [...]``."""
        return self._headers.get((name, index)) or self.line(None, name)

    def position(self, line: int | None) -> str:
        return f"config file {self.source}" + (f", line {line}" if line else "")

    def error(
        self, table: Table, key: str, message: str, fallback: int | None = None,
    ) -> ConfigError:
        line = self.line(table, key) or fallback
        return ConfigError(f"{self.position(line)}: {message}")


def _unquote(token: str) -> str:
    return token[1:-1] if token[:1] in ("'", '"') else token


def _toggles_multiline(line: str) -> bool:
    """Whether ``line`` opens (or closes) a multi-line string without closing (reopening) it."""
    return (line.count('"""') + line.count("'''")) % 2 == 1
