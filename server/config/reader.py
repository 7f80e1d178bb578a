"""Walking a parsed project file: problems collected with key and value, and the shared value rules.

Every section parser takes a ``Reader`` and reports into it instead of raising,
so that ``qualify check`` lists every problem of a file in one run.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any

MISSING = object()  # a key that is absent, as a Problem's value: shown without "= value"
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,62}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a project file."""

    key: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "" if self.value is MISSING else f" = {self.value!r}"
        return f"{self.key}{shown}: {self.message}"


class ProjectError(Exception):
    """A project file that cannot be used; ``problems`` lists why."""

    def __init__(self, path: str, problems: list[Problem]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s)\n{lines}")


def parse_duration(value: Any) -> float:
    """'15m', '30s', '1h', '500ms' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a duration such as '15m' or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError("must be a duration such as '15m', '30s', '1h' or a number of seconds")
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError("must be a finite duration")
    if seconds < 0:
        raise ValueError("must not be negative")
    return seconds


class Reader:
    """Walks the parsed TOML, collecting problems instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def problem(self, key: str, value: Any, message: str) -> None:
        self.problems.append(Problem(key, value, message))

    def table(self, data: dict, key: str, allowed: tuple[str, ...], prefix: str = "") -> dict:
        value = data.get(key, MISSING)
        path = prefix + key
        if value is MISSING:
            return {}
        if not isinstance(value, dict):
            self.problem(path, value, "must be a table")
            return {}
        self.unknown_keys(value, allowed, path + ".")
        return value

    def unknown_keys(self, data: dict, allowed: tuple[str, ...], prefix: str) -> None:
        for k in data:
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1)
                more = f" (did you mean '{hint[0]}'?)" if hint else f" (known keys: {', '.join(allowed)})"
                self.problem(prefix + k, MISSING, "unknown key" + more)

    def string(self, data: dict, key: str, path: str, required: bool = True, default: str | None = None) -> str | None:
        value = data.get(key, MISSING)
        if value is MISSING:
            if required:
                self.problem(path, MISSING, "is required")
            return default
        if not isinstance(value, str) or not value.strip():
            self.problem(path, value, "must be a non-empty string")
            return default
        return value

    def integer(self, table: dict, path: str, default: int, lo: int, hi: int) -> int:
        """``table``'s entry for the last part of ``path``: an integer from lo to hi, else ``default``."""
        value = table.get(path.rsplit(".", 1)[1], default)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            self.problem(path, value, f"must be an integer from {lo} to {hi}")
            return default
        return value

    def duration(self, table: dict, path: str, default: Any, positive: bool = False) -> Any:
        """``table``'s entry for the last part of ``path`` as seconds (see parse_duration), else ``default``."""
        key = path.rsplit(".", 1)[1]
        if key not in table:
            return default
        try:
            seconds = parse_duration(table[key])
            if positive and seconds <= 0:
                raise ValueError("must be longer than 0")
        except ValueError as exc:
            self.problem(path, table[key], str(exc))
            return default
        return seconds
