"""Input checks shared by every store: names, ids, vectors, metadata, queries and top_k.

Each check raises :class:`~clipserve.errors.InvalidInputError` (or its subclass
:class:`~clipserve.errors.DimensionMismatchError`) with a message that names the limit, and
returns the input in the form the stores use (float32 arrays, plain dicts).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from clipserve.errors import DimensionMismatchError, InvalidInputError, quote
from clipserve.index.base import (
    INDEX_KINDS,
    MAX_DIM,
    MAX_ID_BYTES,
    MAX_METADATA_BYTES,
    MAX_TOP_K,
    METRICS,
    NAME_PATTERN,
    CollectionSpec,
    IndexKind,
    Metric,
    Vectors,
)

MAX_ABS_VALUE = 1e15


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidInputError(
            f"invalid collection name {quote(str(name), 80)!r}: names are 1-64 characters "
            "of letters, digits, '_' and '-'"
        )
    return name


def check_spec(
    name: str,
    dim: Any,
    metric: Any,
    index: Any,
    model: str | None,
    params: Mapping[str, Any] | None,
) -> CollectionSpec:
    """The spec of a collection about to be created (index parameters are checked later, by
    the index kind itself)."""
    check_name(name)
    if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= MAX_DIM:
        raise InvalidInputError(f"dim must be an integer in 1..{MAX_DIM}, not {dim!r}")
    if metric not in METRICS:
        raise InvalidInputError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    if index not in INDEX_KINDS:
        raise InvalidInputError(
            f"index must be one of {', '.join(INDEX_KINDS)}, not {quote(str(index), 40)!r}"
        )
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 200):
        raise InvalidInputError("model must be a non-empty string of at most 200 characters")
    if params is not None and not isinstance(params, Mapping):
        raise InvalidInputError("params must be an object")
    m: Metric = metric
    k: IndexKind = index
    return CollectionSpec(name, dim, m, k, model, dict(params or {}))


def check_ids(ids: Any) -> list[str]:
    """Ids of one batch: non-empty strings of at most MAX_ID_BYTES bytes, no duplicates."""
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise InvalidInputError("ids must be a list of strings")
    out = list(ids)
    for item in out:
        if not isinstance(item, str) or not item:
            raise InvalidInputError("every id must be a non-empty string")
        if len(item) > MAX_ID_BYTES or len(item.encode("utf-8")) > MAX_ID_BYTES:
            raise InvalidInputError(
                f"id {quote(item, 60)!r} is longer than {MAX_ID_BYTES} bytes of UTF-8"
            )
    if len(set(out)) != len(out):
        seen: set[str] = set()
        for item in out:
            if item in seen:
                raise InvalidInputError(f"id {quote(item, 60)!r} appears twice in one batch")
            seen.add(item)
    return out


def check_vectors(
    vectors: npt.ArrayLike, count: int, dim: int, metric: Metric, collection: str
) -> Vectors:
    """A ``(count, dim)`` float32 matrix of finite values, unit-normalised for cosine."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("vectors must be a numeric (n, dim) array") from exc
    if arr.ndim == 1 and count == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise InvalidInputError(f"vectors must be a 2-D (n, dim) array, not {arr.ndim}-D")
    if arr.shape[0] != count:
        raise InvalidInputError(f"got {count} ids but {arr.shape[0]} vectors")
    if arr.shape[1] != dim:
        raise DimensionMismatchError(collection, dim, int(arr.shape[1]))
    return _finite_normalised(arr, metric, "vector")


def check_query(query: npt.ArrayLike, dim: int, metric: Metric, collection: str) -> Vectors:
    """One query as a ``(dim,)`` float32 vector."""
    try:
        arr = np.asarray(query, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError("query must be a numeric vector") from exc
    if arr.ndim == 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 1:
        raise InvalidInputError(f"query must be one vector of shape ({dim},), not {arr.shape}")
    if arr.shape[0] != dim:
        raise DimensionMismatchError(collection, dim, int(arr.shape[0]), what="query")
    return _finite_normalised(arr.reshape(1, -1), metric, "query").reshape(-1)


def _finite_normalised(arr: Vectors, metric: Metric, what: str) -> Vectors:
    if not np.isfinite(arr).all():
        raise InvalidInputError(f"{what} values must be finite (no NaN or infinity)")
    if arr.size and float(np.abs(arr).max()) > MAX_ABS_VALUE:
        # keeps every score (inner products, squared distances) finite in float32
        raise InvalidInputError(f"{what} values must be at most {MAX_ABS_VALUE:g} in magnitude")
    if metric != "cosine":
        return np.ascontiguousarray(arr)
    norms = np.linalg.norm(arr.astype(np.float64), axis=1, keepdims=True)
    if (norms == 0).any():
        raise InvalidInputError(f"a zero {what} has no direction: the metric is cosine")
    return np.ascontiguousarray((arr / norms).astype(np.float32))


def check_metadata(metadata: Any, count: int) -> list[dict[str, Any]]:
    """One JSON object per item (``None`` means empty objects), each at most
    MAX_METADATA_BYTES of compact JSON. Returns deep copies the store can keep."""
    if metadata is None:
        return [{} for _ in range(count)]
    if isinstance(metadata, Mapping | str) or not isinstance(metadata, Sequence):
        raise InvalidInputError("metadata must be a list of objects, one per id")
    if len(metadata) != count:
        raise InvalidInputError(f"got {count} ids but {len(metadata)} metadata objects")
    out = []
    for item in metadata:
        if not isinstance(item, Mapping) or not all(isinstance(k, str) for k in item):
            raise InvalidInputError("each metadata entry must be an object with string keys")
        try:
            text = json.dumps(item, allow_nan=False, separators=(",", ":"), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                "metadata must be JSON: strings, finite numbers, booleans, null, lists, objects"
            ) from exc
        if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
            raise InvalidInputError(
                f"one item's metadata is over {MAX_METADATA_BYTES} bytes as JSON"
            )
        out.append(json.loads(text))
    return out


def check_top_k(top_k: Any, size: int, collection: str) -> int:
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise InvalidInputError(f"top_k must be a positive integer, not {quote(repr(top_k), 40)}")
    if top_k > MAX_TOP_K:
        raise InvalidInputError(f"top_k {top_k} is over the limit of {MAX_TOP_K}")
    if size == 0:
        raise InvalidInputError(
            f"collection '{collection}' is empty: add vectors before searching it"
        )
    if top_k > size:
        raise InvalidInputError(
            f"top_k {top_k} exceeds the size of collection '{collection}' ({size} items)",
            detail={"collection": collection, "top_k": top_k, "size": size},
        )
    return top_k
