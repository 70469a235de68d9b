"""The VectorStore contract on Milvus (``pymilvus``), a server or a milvus-lite ``.db`` file.

:class:`MilvusCatalog` is configured by a URI (``http://host:19530``, or a local file path for
milvus-lite). Each clipserve collection is one Milvus collection named ``cs_<encoded name>``
(``_`` becomes ``__`` and ``-`` becomes ``_0``, so names stay distinct) with three fields: ``id``
(VARCHAR(512), primary key), ``vector`` (FLOAT_VECTOR) and ``metadata`` (JSON). The spec is kept
in the collection's properties (``clipserve.spec``), so ``get`` after a restart finds it.

- Metrics map to ``COSINE``, ``IP`` and ``L2``; Milvus' squared L2 distances are returned as
  Euclidean distances, like the local stores.
- Filters become Milvus expressions: ``metadata["k"] == <literal>``, and ``$in`` an OR of
  equalities (milvus-lite cannot apply ``in`` to a JSON path). Keys are identifier-like (see
  :mod:`~clipserve.index.filters`), strings are escaped (backslash, both quotes, newline,
  carriage return, tab), numbers are written with ``repr``. Unlike the local stores, Milvus
  compares JSON booleans and numbers by value (``true`` matches ``1``).
- Ids in expressions (delete, fetch) are escaped the same way; pymilvus' own ``ids=`` helpers
  are not used because they do not escape.
- When a search returns fewer than ``min(top_k, matches)`` hits (a filtered ANN search can), the
  matching rows are counted and, when there are more and at most ``EXACT_FALLBACK_LIMIT``, they
  are fetched and scanned exactly here.

Thread-safety: each store has a readers-writer lock (mutations alone, searches together); all
stores of a catalog share its client, whose gRPC channel is thread-safe.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from clipserve.errors import (
    CollectionConflictError,
    CollectionNotFoundError,
    IndexBackendError,
    InvalidInputError,
    quote,
)
from clipserve.index.ann import parse_params, require
from clipserve.index.base import CollectionSpec, Hit, IndexKind, Metric, StoreInfo
from clipserve.index.filters import parse_filter
from clipserve.index.lock import ReadWriteLock
from clipserve.index.milvus_expr import (
    collection_name,
    decode_name,
    expression,
    ids_expression,
)
from clipserve.index.validation import (
    check_ids,
    check_metadata,
    check_name,
    check_query,
    check_spec,
    check_top_k,
    check_vectors,
)

SPEC_PROPERTY = "clipserve.spec"
EXACT_FALLBACK_LIMIT = 16_384
SIZE_TTL_S = 1.0
BATCH_BYTES = 8 << 20
"""Rows are sent in batches of about this many bytes (gRPC messages have a size limit)."""
IDS_PER_EXPRESSION = 1_000
_METRICS: dict[Metric, str] = {"cosine": "COSINE", "ip": "IP", "l2": "L2"}
_INDEX_TYPES = ("FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "AUTOINDEX")


@dataclass(frozen=True, slots=True)
class MilvusParams:
    index_type: str = "HNSW"
    m: int = 16
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 128
    nprobe: int = 32

    def check(self) -> None:
        kind = "milvus"
        require(self.index_type in _INDEX_TYPES, kind, f"index_type is one of {_INDEX_TYPES}")
        require(4 <= self.m <= 128, kind, "m is 4..128")
        require(8 <= self.ef_construction <= 2048, kind, "ef_construction is 8..2048")
        require(1 <= self.ef_search <= 16_384, kind, "ef_search is 1..16384")
        require(1 <= self.nlist <= 65_536, kind, "nlist is 1..65536")
        require(1 <= self.nprobe <= 65_536, kind, "nprobe is 1..65536")


class MilvusVectorStore:
    def __init__(self, client: Any, spec: CollectionSpec) -> None:
        self._client = client
        self._spec = spec
        self._params = parse_params(MilvusParams, spec.params, "milvus")
        self._collection = collection_name(spec.name)
        self._lock = ReadWriteLock()
        self._closed = False
        self._size: tuple[int, float] | None = None  # (count, when), for the top_k check

    @property
    def spec(self) -> CollectionSpec:
        return self._spec

    def _size_for_search(self) -> int:
        """The row count, re-counted after our own writes or when older than SIZE_TTL_S (a
        count costs a round trip; writers elsewhere are seen within the TTL)."""
        now = time.monotonic()
        cached = self._size
        if cached is None or now - cached[1] > SIZE_TTL_S:
            cached = (self._count(""), now)
            self._size = cached
        return cached[0]

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise CollectionNotFoundError(self._spec.name)
        return call(self._client, method, self._collection, *args, **kwargs)

    def __len__(self) -> int:
        with self._lock.read():
            return self._count("")

    def _count(self, expr: str) -> int:
        rows = self._call("query", filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def add(
        self,
        ids: Sequence[str],
        vectors: npt.ArrayLike,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        spec = self._spec
        ids = check_ids(ids)
        if not ids:
            return
        matrix = check_vectors(vectors, len(ids), spec.dim, spec.metric, spec.name)
        meta = check_metadata(metadata, len(ids))
        row_bytes = spec.dim * 4 + 256 + max(len(json.dumps(m)) for m in meta)
        per_call = max(1, BATCH_BYTES // row_bytes)
        with self._lock.write():
            self._size = None
            for start in range(0, len(ids), per_call):
                stop = start + per_call
                rows = [
                    {"id": i, "vector": v, "metadata": m}
                    for i, v, m in zip(
                        ids[start:stop], matrix[start:stop], meta[start:stop], strict=True
                    )
                ]
                self._call("upsert", rows)

    def delete(self, ids: Sequence[str]) -> int:
        ids = check_ids(list(dict.fromkeys(ids)) if not isinstance(ids, str) else ids)
        removed = 0
        with self._lock.write():
            self._size = None
            for chunk in _chunks(ids, IDS_PER_EXPRESSION):
                expr = ids_expression(chunk)
                found = self._count(expr)
                if found:
                    self._call("delete", filter=expr)
                removed += found
        return removed

    def search(
        self,
        query: npt.ArrayLike,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        spec = self._spec
        q = check_query(query, spec.dim, spec.metric, spec.name)
        flt = parse_filter(filter)
        with self._lock.read():
            check_top_k(top_k, self._size_for_search(), spec.name)
            if flt is not None and flt.matches_nothing:
                return []
            expr = expression(flt)
            result = self._call(
                "search",
                data=[q.tolist()],
                limit=top_k,
                filter=expr,
                output_fields=["metadata"],
                search_params={"metric_type": _METRICS[spec.metric], "params": self._search(top_k)},
            )
            hits = [self._hit(h["id"], float(h["distance"]), h["entity"]) for h in result[0]]
            if len(hits) < top_k:
                matches = self._count(expr)
                if len(hits) < min(top_k, matches) <= EXACT_FALLBACK_LIMIT:
                    return self._exact(q, min(top_k, matches), expr)
            return hits

    def _search(self, top_k: int) -> dict[str, int]:
        p = self._params
        if p.index_type.startswith("HNSW"):
            return {"ef": max(p.ef_search, top_k)}
        if p.index_type.startswith("IVF"):
            return {"nprobe": min(p.nprobe, p.nlist)}
        return {}

    def _hit(self, item_id: str, distance: float, entity: Mapping[str, Any]) -> Hit:
        score = math.sqrt(max(0.0, distance)) if self._spec.metric == "l2" else distance
        return Hit(str(item_id), score, dict(entity.get("metadata") or {}))

    def _exact(self, q: npt.NDArray[np.float32], k: int, expr: str) -> list[Hit]:
        rows = self._call(
            "query",
            filter=expr,
            output_fields=["id", "vector", "metadata"],
            limit=EXACT_FALLBACK_LIMIT,
        )
        if not rows:
            return []
        vectors = np.asarray([r["vector"] for r in rows], dtype=np.float64)
        if self._spec.metric == "l2":
            scores = np.linalg.norm(vectors - q, axis=1)
            order = np.argsort(scores, kind="stable")[:k]
        else:
            if self._spec.metric == "cosine":
                vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
            scores = vectors @ q.astype(np.float64)
            order = np.argsort(-scores, kind="stable")[:k]
        return [
            Hit(str(rows[i]["id"]), float(scores[i]), dict(rows[i].get("metadata") or {}))
            for i in order
        ]

    def info(self) -> StoreInfo:
        with self._lock.read():
            spec = self._spec
            return StoreInfo(
                name=spec.name,
                size=self._count(""),
                dim=spec.dim,
                metric=spec.metric,
                index="milvus",
                model=spec.model,
                trained=True,
                memory_bytes=None,
                params={"collection": self._collection, **self._effective_params()},
            )

    def _effective_params(self) -> dict[str, Any]:
        p = asdict(self._params)
        keep: tuple[str, ...]
        if self._params.index_type.startswith("HNSW"):
            keep = ("index_type", "m", "ef_construction", "ef_search")
        elif self._params.index_type.startswith("IVF"):
            keep = ("index_type", "nlist", "nprobe")
        else:
            keep = ("index_type",)
        return {k: p[k] for k in keep}

    def save(self) -> None:
        with self._lock.read():
            self._call("flush")

    def close(self) -> None:
        with self._lock.write():
            self._closed = True


class MilvusCatalog:
    """Collections on one Milvus (server URI or milvus-lite file), sharing one client."""

    def __init__(self, uri: str, *, token: str | None = None, client: Any = None) -> None:
        if client is None:
            try:
                from pymilvus import MilvusClient
            except ImportError as exc:  # pragma: no cover - a declared dependency
                raise IndexBackendError("pymilvus is not installed") from exc
            kwargs = {"token": token} if token else {}
            try:
                client = MilvusClient(uri, **kwargs)
            except Exception as exc:
                raise IndexBackendError(f"cannot connect to Milvus: {_reason(exc)}") from exc
        self._client = client
        self._stores: dict[str, MilvusVectorStore] = {}
        self._lock = threading.Lock()

    def create(
        self,
        name: str,
        *,
        dim: int,
        metric: Metric = "cosine",
        index: IndexKind = "milvus",
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> MilvusVectorStore:
        if index != "milvus":
            raise InvalidInputError(f"a Milvus catalog only holds index 'milvus', not {index!r}")
        spec = check_spec(name, dim, metric, index, model, params)
        p = parse_params(MilvusParams, spec.params, "milvus")
        p.check()
        with self._lock:
            return self._create(spec, p)

    def _create(self, spec: CollectionSpec, p: MilvusParams) -> MilvusVectorStore:
        name, dim, metric = spec.name, spec.dim, spec.metric
        cname = collection_name(name)
        if call(self._client, "has_collection", cname):
            raise CollectionConflictError(name)
        from pymilvus import DataType

        schema = call(self._client, "create_schema", auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=512)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        schema.add_field("metadata", DataType.JSON)
        index_params = call(self._client, "prepare_index_params")
        build: dict[str, int] = {}
        if p.index_type.startswith("HNSW"):
            build = {"M": p.m, "efConstruction": p.ef_construction}
        elif p.index_type.startswith("IVF"):
            build = {"nlist": p.nlist}
        index_params.add_index(
            "vector", index_type=p.index_type, metric_type=_METRICS[metric], params=build
        )
        properties = {SPEC_PROPERTY: json.dumps(_spec_json(spec))}
        call(
            self._client,
            "create_collection",
            cname,
            schema=schema,
            index_params=index_params,
            properties=properties,
        )
        store = MilvusVectorStore(self._client, spec)
        self._stores[name] = store
        return store

    def get(self, name: str) -> MilvusVectorStore:
        with self._lock:
            return self._get(name)

    def _get(self, name: str) -> MilvusVectorStore:
        if name in self._stores:
            return self._stores[name]
        try:
            check_name(name)
        except InvalidInputError:
            raise CollectionNotFoundError(name) from None
        cname = collection_name(name)
        if not call(self._client, "has_collection", cname):
            raise CollectionNotFoundError(name)
        described = call(self._client, "describe_collection", cname)
        raw = (described.get("properties") or {}).get(SPEC_PROPERTY)
        if raw is None:
            raise IndexBackendError(f"Milvus collection '{cname}' has no clipserve spec")
        data = json.loads(raw)
        spec = check_spec(
            data["name"],
            data["dim"],
            data["metric"],
            "milvus",
            data.get("model"),
            data.get("params") or {},
        )
        call(self._client, "load_collection", cname)
        store = MilvusVectorStore(self._client, spec)
        self._stores[name] = store
        return store

    def names(self) -> list[str]:
        found = (decode_name(n) for n in call(self._client, "list_collections"))
        return sorted(n for n in found if n is not None)

    def specs(self) -> list[CollectionSpec]:
        return [self.get(n).spec for n in self.names()]

    def delete(self, name: str) -> None:
        with self._lock:
            store = self._get(name)
            store.close()
            self._stores.pop(name, None)
            call(self._client, "drop_collection", collection_name(name))

    def close(self) -> None:
        with self._lock:
            for store in self._stores.values():
                store.close()
            self._stores.clear()
            call(self._client, "close")


def call(client: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """A pymilvus call whose failures become IndexBackendError (server-side problems)."""
    try:
        return getattr(client, method)(*args, **kwargs)
    except Exception as exc:
        raise IndexBackendError(f"Milvus {method} failed: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    return quote(str(getattr(exc, "message", None) or exc), 300)


def _spec_json(spec: CollectionSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "dim": spec.dim,
        "metric": spec.metric,
        "model": spec.model,
        "params": dict(spec.params),
    }


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
