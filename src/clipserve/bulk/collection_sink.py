"""``clipserve embed --collection NAME``: each shard's vectors also go into a collection (upserted
by row key, with the row's paths, caption and metadata), in this process's data directory or
through a running service.

A shard is added to the collection before its files are written (the Parquet table is the
commit), so a run interrupted between the two adds it again on resume: upserts by key, so the
collection ends the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np

from clipserve.bulk.records import BulkInputError, Record
from clipserve.bulk.writer import FileSink, Shard
from clipserve.errors import ClipServeError, quote
from clipserve.index import CollectionManager, VectorStore

_REQUEST_ITEMS = 256


class Target(Protocol):
    model: str | None

    def add(
        self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[Mapping[str, Any]]
    ) -> None: ...

    def close(self) -> None: ...


class LocalTarget:
    """A collection of a local data directory (which no running server may hold)."""

    def __init__(self, data_dir: Path, name: str) -> None:
        try:
            self._manager = CollectionManager(data_dir)
        except ClipServeError as exc:
            raise BulkInputError(f"{exc.message}: use --service-url to go through it") from exc
        try:
            self._store: VectorStore = self._manager.get(name)
        except ClipServeError as exc:
            self._manager.close(save=False)
            raise BulkInputError(exc.message) from exc
        self.model = self._store.spec.model

    def add(
        self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[Mapping[str, Any]]
    ) -> None:
        self._store.add(ids, vectors, metadata)
        self._store.save()

    def close(self) -> None:
        self._manager.close()


class RemoteTarget:
    """A collection of a running service (``POST /v1/collections/NAME/items`` with vectors)."""

    def __init__(
        self,
        service_url: str,
        name: str,
        *,
        api_key: str | None,
        timeout_s: float,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            base_url=service_url.rstrip("/"),
            headers=headers,
            timeout=timeout_s,
            transport=transport,
        )
        self._path = f"/v1/collections/{name}"
        info = self._call("GET", self._path)
        self.model = info.get("model")

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        try:
            response = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ClipServeError(f"the service cannot be reached: {exc}") from exc
        if response.status_code != 200:
            try:
                message = str(response.json().get("error", response.text))
            except ValueError:
                message = response.text
            raise ClipServeError(f"the service answered {response.status_code}: {quote(message)}")
        data: dict[str, Any] = response.json()
        return data

    def add(
        self, ids: Sequence[str], vectors: np.ndarray, metadata: Sequence[Mapping[str, Any]]
    ) -> None:
        for start in range(0, len(ids), _REQUEST_ITEMS):
            end = start + _REQUEST_ITEMS
            items = [
                {"id": i, "vector": v.tolist(), "metadata": dict(m)}
                for i, v, m in zip(
                    ids[start:end], vectors[start:end], metadata[start:end], strict=True
                )
            ]
            answer = self._call("POST", f"{self._path}/items", {"items": items})
            if answer.get("errors"):
                first = answer["errors"][0]
                raise ClipServeError(f"the collection refused item {first['id']}: {first['error']}")

    def close(self) -> None:
        self._client.close()


def _metadata(row: Record) -> dict[str, Any]:
    fixed = {"image_path": row.image_path, "url": row.url, "caption": row.caption}
    return {**{k: v for k, v in fixed.items() if v is not None}, **row.metadata}


class CollectionSink:
    """The files of :class:`FileSink` (they mark what is done, for resume), and the collection:
    image embeddings when the run embeds images, else text embeddings."""

    def __init__(self, files: FileSink, target: Target, *, model: str | None) -> None:
        if model is not None and target.model is not None and model != target.model:
            target.close()
            raise BulkInputError(
                f"the collection holds embeddings of model '{target.model}', not '{model}': "
                f"run with --model {target.model}"
            )
        self._files = files
        self._target = target

    def is_finished(self, number: int) -> bool:
        return self._files.is_finished(number)

    def write_shard(self, shard: Shard) -> None:
        vectors = (
            shard.image_embeddings if shard.image_embeddings is not None else shard.text_embeddings
        )
        if vectors is not None and len(shard.rows):
            rows = shard.rows
            self._target.add([r.key for r in rows], vectors, [_metadata(r) for r in rows])
        self._files.write_shard(shard)

    def close(self) -> None:
        try:
            self._files.close()
        finally:
            self._target.close()
