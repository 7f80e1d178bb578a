"""Value types shared by the project file, the warehouse sync and the API."""

from __future__ import annotations

import enum


class ValueType(enum.IntEnum):
    """A column's type. The numbers are qualify.v1.ValueType's."""

    STRING = 1
    INT = 2
    FLOAT = 3
    BOOL = 4
    TIMESTAMP = 5

    @classmethod
    def parse(cls, name: str) -> "ValueType":
        """'string' | 'int' | 'float' | 'bool' | 'timestamp' (a few aliases too)."""
        return cls[_ALIASES.get(name.lower(), name.upper())]


_ALIASES = {
    "str": "STRING", "text": "STRING", "varchar": "STRING",
    "integer": "INT", "bigint": "INT", "long": "INT",
    "double": "FLOAT", "number": "FLOAT", "real": "FLOAT",
    "boolean": "BOOL",
    "datetime": "TIMESTAMP", "date": "TIMESTAMP",
}

TYPE_NAMES = ("string", "int", "float", "bool", "timestamp")
