"""Typed reading of cluster YAML mappings: every bad value becomes a ClusterError that names
the dotted field, the problem and the fix ("node.gpus: must be an integer, got 'eight';
write a whole number such as 8").

`Reader` wraps one mapping, remembers which keys were read, and `done()` rejects the rest as
unknown fields (with the closest valid name). Nothing here knows about clusters; cluster.py
and catalog.py use it.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from tera.topologies.errors import ClusterError

_MISSING = object()


class Reader:
    """Typed, field-named access to one mapping of a YAML description."""

    def __init__(self, data: Any, prefix: str):
        if not isinstance(data, dict):
            raise ClusterError(
                prefix or "cluster",
                f"must be a mapping, got {_show(data)}",
                "write `key: value` lines under it",
            )
        self.data = data
        self.prefix = prefix
        self.seen: set[str] = set()

    def field(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def raw(self, key: str, required: bool = True, default: Any = None, hint: str = "") -> Any:
        self.seen.add(key)
        value = self.data.get(key, None)
        if value is None:
            if required and default is None:
                raise ClusterError(self.field(key), "missing", hint or f"add `{key}:`")
            return default
        return value

    def str(self, key: str, required: bool = True, default: str | None = None) -> str | None:
        value = self.raw(key, required, default)
        if value is None:
            return None
        if not isinstance(value, str):
            raise ClusterError(
                self.field(key), f"must be a string, got {_show(value)}", "quote the value"
            )
        return value

    def number(self, key: str, default: Any = _MISSING, hint: str = "") -> float | None:
        required = default is _MISSING
        value = self.raw(key, required, None if required else default, hint)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ClusterError(
                self.field(key),
                f"must be a number, got {_show(value)}",
                hint or "write a plain number without units",
            )
        try:
            number = float(value)
        except OverflowError:  # an integer past float's range
            number = math.inf
        if not math.isfinite(number):  # also YAML's .nan and .inf
            raise ClusterError(
                self.field(key),
                f"must be a finite number, got {_show(value)}",
                hint or "write a plain number without units",
            )
        return number

    def positive(self, key: str, default: Any = _MISSING, hint: str = "") -> float | None:
        value = self.number(key, default, hint)
        if value is not None and not value > 0:
            raise ClusterError(
                self.field(key), f"must be > 0, got {_fmt(value)}", hint or "use a positive number"
            )
        return value

    def positive_int(self, key: str, default: Any = _MISSING, hint: str = "") -> int | None:
        required = default is _MISSING
        value = self.raw(key, required, None if required else default, hint)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ClusterError(
                    self.field(key),
                    f"must be an integer, got {_show(value)}",
                    hint or "write a whole number such as 8",
                )
        if value <= 0:
            raise ClusterError(
                self.field(key), f"must be > 0, got {value}", hint or "use a positive integer"
            )
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str | None = None) -> str:
        value = self.raw(key, default is None, default, f"add `{key}:` ({' | '.join(choices)})")
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ClusterError(
                self.field(key),
                f"unknown value {_show(value)}",
                f"{hint}use one of {', '.join(choices)}",
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, False, default)
        if not isinstance(value, bool):
            raise ClusterError(
                self.field(key), f"must be true or false, got {_show(value)}", "write true or false"
            )
        return value

    def mapping(self, key: str, required: bool = True) -> dict[str, Any] | None:
        value = self.raw(key, required, None, f"add a `{key}:` mapping")
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ClusterError(
                self.field(key), f"must be a mapping, got {_show(value)}", "indent its fields"
            )
        return value

    def list(self, key: str, required: bool = True) -> list[Any] | None:
        value = self.raw(key, required, None)
        if value is None:
            return None
        if not isinstance(value, list):
            raise ClusterError(
                self.field(key), f"must be a list, got {_show(value)}", "write [a, b, ...]"
            )
        return value

    def ignore(self, *keys: str) -> None:
        self.seen.update(keys)

    def done(self) -> None:
        """Reject keys that were never read: they are typos or unsupported fields."""
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            key = str(unknown[0])
            if not key.isprintable():  # a line break in the key must not break the line
                key = repr(unknown[0])
            close = difflib.get_close_matches(key, sorted(self.seen), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ClusterError(
                self.field(key),
                "unknown field",
                f"{hint}valid fields here: {', '.join(sorted(self.seen))}",
            )


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{type(value).__name__} {value!r}"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
