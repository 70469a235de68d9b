"""Milvus collection names and filter expressions, escaped.

- A clipserve name maps to ``cs_<name>`` with ``_`` written ``__`` and ``-`` written ``_0``
  (Milvus names allow neither ``-`` nor a leading digit), a reversible code.
- String literals escape backslash, both quotes, newline, carriage return and tab: Milvus'
  grammar (and milvus-lite's lexer) accepts these escapes and rejects raw line breaks.
- Keys come from :mod:`~clipserve.index.filters`, which allows only identifier-like keys, so a
  key never needs escaping inside ``metadata["..."]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from clipserve.index.filters import MetadataFilter, Scalar

PREFIX = "cs_"


def collection_name(name: str) -> str:
    return PREFIX + name.replace("_", "__").replace("-", "_0")


def decode_name(milvus_name: str) -> str | None:
    """The clipserve name of a Milvus collection, or None when it is not one of ours."""
    if not milvus_name.startswith(PREFIX):
        return None
    out, rest = [], milvus_name[len(PREFIX) :]
    i = 0
    while i < len(rest):
        if rest[i] == "_":
            pair = rest[i : i + 2]
            if pair not in ("__", "_0"):
                return None
            out.append("_" if pair == "__" else "-")
            i += 2
        else:
            out.append(rest[i])
            i += 1
    return "".join(out)


def literal(value: Scalar) -> str:
    """A Milvus expression literal for a filter value or an id."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("'", "\\'")
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def expression(flt: MetadataFilter | None) -> str:
    """The Milvus boolean expression of a parsed filter ("" for none)."""
    if flt is None:
        return ""
    parts = []
    for cond in flt.conditions:
        ors = [f'metadata["{cond.key}"] == {literal(v)}' for v in cond.values]
        parts.append(ors[0] if len(ors) == 1 else "(" + " or ".join(ors) + ")")
    return " and ".join(parts)


def ids_expression(ids: Sequence[str]) -> str:
    return "id in [" + ", ".join(literal(i) for i in ids) + "]"
