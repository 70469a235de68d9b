"""Metadata filters: the small language every store understands.

A filter is a mapping from a top-level metadata key to a condition; all conditions must hold:

- ``{"color": "red"}``: the item's ``color`` equals ``"red"``;
- ``{"year": {"$in": [2023, 2024]}}``: the item's ``year`` is one of the values.

Values are JSON scalars: strings, numbers and booleans (``null``, lists and objects are
rejected). Matching is by JSON type and value: ``1`` matches ``1`` and ``1.0``, never ``true``
or ``"1"``; a key the item lacks never matches. Keys are identifier-like
(``^[A-Za-z_][A-Za-z0-9_-]{0,63}$``) so that every backend can address them without quoting
tricks. A filter has at most ``MAX_CONDITIONS`` keys and ``MAX_IN_VALUES`` values per ``$in``,
so one request's filtering cost is bounded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clipserve.errors import InvalidInputError, quote

KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
MAX_CONDITIONS = 16
MAX_IN_VALUES = 256
MAX_VALUE_CHARS = 1024

Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Condition:
    """``metadata[key]`` is one of ``values`` (equality is a one-value condition)."""

    key: str
    values: tuple[Scalar, ...]


@dataclass(frozen=True, slots=True)
class MetadataFilter:
    """A parsed filter: every condition must hold. An empty filter matches everything."""

    conditions: tuple[Condition, ...]

    @property
    def matches_nothing(self) -> bool:
        """True when some ``$in`` list is empty, so no item can match."""
        return any(not c.values for c in self.conditions)

    def matches(self, metadata: Mapping[str, Any]) -> bool:
        for cond in self.conditions:
            if cond.key not in metadata:
                return False
            value = metadata[cond.key]
            if not any(same_value(value, wanted) for wanted in cond.values):
                return False
        return True


def same_value(value: Any, wanted: Scalar) -> bool:
    """JSON equality of a stored value and a filter value: booleans only equal booleans,
    numbers equal numbers of any kind with the same value, strings equal strings."""
    if isinstance(wanted, bool) or isinstance(value, bool):
        return isinstance(wanted, bool) and isinstance(value, bool) and value is wanted
    if isinstance(wanted, str) or isinstance(value, str):
        return isinstance(wanted, str) and isinstance(value, str) and value == wanted
    if isinstance(value, int | float) and isinstance(wanted, int | float):
        return bool(value == wanted)
    return False


def parse_filter(raw: Mapping[str, Any] | None) -> MetadataFilter | None:
    """Validate a filter as a client sent it; None (or ``{}``) means no filter."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise InvalidInputError("filter must be an object mapping metadata keys to conditions")
    if not raw:
        return None
    if len(raw) > MAX_CONDITIONS:
        raise InvalidInputError(f"filter has {len(raw)} keys; at most {MAX_CONDITIONS} are allowed")
    conditions = []
    for key, cond in raw.items():
        if not isinstance(key, str) or not KEY_PATTERN.match(key):
            raise InvalidInputError(
                f"filter key {quote(str(key), 80)!r} is invalid: keys match {KEY_PATTERN.pattern}"
            )
        conditions.append(Condition(key, _parse_condition(key, cond)))
    return MetadataFilter(tuple(conditions))


def _parse_condition(key: str, cond: Any) -> tuple[Scalar, ...]:
    if isinstance(cond, Mapping):
        if set(cond) != {"$in"}:
            ops = ", ".join(sorted(quote(str(k), 20) for k in cond)[:5])
            raise InvalidInputError(
                f"filter on '{key}': unsupported operator(s) {ops}; only $in is supported"
            )
        values = cond["$in"]
        if not isinstance(values, list | tuple):
            raise InvalidInputError(f"filter on '{key}': $in takes a list of values")
        if len(values) > MAX_IN_VALUES:
            raise InvalidInputError(
                f"filter on '{key}': $in has {len(values)} values; at most {MAX_IN_VALUES}"
            )
        return tuple(_scalar(key, v) for v in values)
    return (_scalar(key, cond),)


def _scalar(key: str, value: Any) -> Scalar:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInputError(f"filter on '{key}': integers must fit in 64 bits")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"filter on '{key}': numbers must be finite")
        return value
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise InvalidInputError(
                f"filter on '{key}': a string value has {len(value)} characters; "
                f"at most {MAX_VALUE_CHARS}"
            )
        return value
    kind = "null" if value is None else type(value).__name__
    raise InvalidInputError(
        f"filter on '{key}': values must be strings, numbers or booleans, not {kind}"
    )
