"""Vector collections: items embedded through the batcher and the cache, searched by a text, an
image, or both (the weighted sum of their normalised embeddings: the seed's multimodal query).

A collection belongs to one model (its vectors' space): items and queries are embedded with it. It
lives in the local store (:class:`~clipserve.index.CollectionManager`, FAISS or ScaNN under
``collections.data_dir``, opened at start-up when the directory exists, else at the first
collection) or on Milvus (``collections.milvus_uri``).

Contract: index work (add, search, save, training) runs on one thread of its own, never on the
event loop or the device thread, with FAISS held to one OpenMP thread there so it never competes
with the encoder's team; local collections are saved every ``save_interval_s`` by a task this
object owns (and on close), each save atomic, so an add is durable within that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

import numpy as np

from clipserve.config import CollectionsSettings
from clipserve.engine.core import EngineCore
from clipserve.engine.tasks.embed import Content, Embedding, image_refs, modalities_of
from clipserve.errors import (
    ClipServeError,
    CollectionConflictError,
    CollectionNotFoundError,
    IndexBackendError,
    InvalidInputError,
    ModelNotFoundError,
)
from clipserve.index import CollectionManager, Hit, IndexKind, Metric, StoreInfo, VectorStore
from clipserve.index.milvus import MilvusCatalog

logger = logging.getLogger(__name__)

T = TypeVar("T")
StoreKind = Literal["local", "milvus"]
_MILVUS_INDEX_TYPES: dict[str, str] = {"flat": "FLAT", "hnsw": "HNSW"}


@dataclass(frozen=True, slots=True)
class Item:
    """One item to add: its external id, what to embed (or its embedding, computed elsewhere
    with the collection's model: ``clipserve embed --collection``), its metadata."""

    id: str
    content: Content | np.ndarray
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AddResult:
    collection: str
    added: int
    errors: tuple[tuple[int, str, ClipServeError], ...]
    """(position, id, error) of the items that could not be embedded (not added)."""


@dataclass(frozen=True, slots=True)
class Collection:
    info: StoreInfo
    store: StoreKind


@dataclass(frozen=True, slots=True)
class SearchResult:
    collection: str
    model: str
    hits: list[Hit]


_PENDING = InvalidInputError("not embedded")  # replaced by every embedded item's outcome


def _given_vector(vector: np.ndarray, dim: int) -> np.ndarray | ClipServeError:
    if vector.ndim != 1 or vector.shape[0] != dim:
        return InvalidInputError(
            f"the vector has {vector.size} values; the collection's dimension is {dim}"
        )
    if not np.isfinite(vector).all():
        return InvalidInputError("the vector holds NaN or infinite values")
    return vector


def _one_thread() -> None:
    """The index thread's initializer: FAISS's OpenMP team of one (its own runtime, not
    torch's), so a search never takes the cores from a forward pass."""
    with contextlib.suppress(ImportError):
        import faiss

        faiss.omp_set_num_threads(1)


class Collections:
    def __init__(self, core: EngineCore, embedding: Embedding, settings: CollectionsSettings):
        self._core = core
        self._embedding = embedding
        self.settings = settings
        self._thread = ThreadPoolExecutor(1, "index", initializer=_one_thread)
        self._local: CollectionManager | None = None
        self._milvus: MilvusCatalog | None = None
        self._saver: asyncio.Task[None] | None = None
        self._opening = asyncio.Lock()

    async def _run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._thread, partial(call, *args, **kwargs))

    # --- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the local collections, when there are any; a data directory another process
        holds is logged, and each collection request then answers why (503)."""
        if self.settings.data_dir.is_dir():
            try:
                await self._local_catalog()
            except IndexBackendError as exc:
                logger.warning("local collections are unavailable: %s", exc.message)

    async def _local_catalog(self) -> CollectionManager:
        async with self._opening:
            if self._local is None:
                self._local = await self._run(CollectionManager, self.settings.data_dir)
                self._saver = asyncio.create_task(self._save_periodically(), name="index-saver")
            return self._local

    async def _existing_local(self) -> CollectionManager | None:
        """The local catalog if its directory exists (opened now if start-up could not: then
        the reason is raised), else None."""
        if self._local is None and self.settings.data_dir.is_dir():
            return await self._local_catalog()
        return self._local

    def _milvus_catalog(self) -> MilvusCatalog:
        if self._milvus is None:
            uri = self.settings.milvus_uri
            if uri is None:
                raise InvalidInputError(
                    "store 'milvus' needs collections.milvus_uri (CLIPSERVE_COLLECTIONS__"
                    "MILVUS_URI): a Milvus server's URI or a milvus-lite .db file"
                )
            self._milvus = MilvusCatalog(uri, token=self.settings.milvus_token)
        return self._milvus

    async def _save_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.settings.save_interval_s)
            local = self._local
            if local is None:
                return
            try:
                await self._run(local.save_all)
            except Exception:  # a full disk: logged, retried next time; the index serves on
                logger.exception("saving the collections failed")

    async def close(self) -> None:
        if self._saver is not None:
            self._saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._saver
        try:
            if self._local is not None:
                await self._run(self._local.close)
            if self._milvus is not None:
                await self._run(self._milvus.close)
        finally:
            self._thread.shutdown(wait=True)

    # --- collections ---------------------------------------------------------------------------

    async def create(
        self,
        name: str,
        *,
        model: str | None = None,
        metric: Metric = "cosine",
        index: IndexKind = "flat",
        store: StoreKind = "local",
        params: Mapping[str, Any] | None = None,
    ) -> Collection:
        """A new empty collection for ``model``'s embeddings (loaded to learn their size)."""
        model_name = self._core.resolve_model(model)
        handle = await self._core.registry.get(model_name)
        dim = handle.info.embed_dim
        names = await self._names()  # one listing (a Milvus round trip) for both checks
        if name in names:
            raise CollectionConflictError(name)
        if len(names) >= self.settings.max_collections:
            raise InvalidInputError(
                f"there are {self.settings.max_collections} collections already "
                "(collections.max_collections); delete one first"
            )
        created: VectorStore
        if store == "milvus":
            index_type = _MILVUS_INDEX_TYPES.get(index)
            if index_type is None and not (params and "index_type" in params):
                raise InvalidInputError(
                    f"a Milvus collection's index is flat or hnsw (or params.index_type), "
                    f"not {index!r}"
                )
            chosen = {"index_type": index_type, **(params or {})}
            catalog = self._milvus_catalog()
            created = await self._run(
                catalog.create,
                name,
                dim=dim,
                metric=metric,
                index="milvus",
                model=model_name,
                params=chosen,
            )
        else:
            local = await self._local_catalog()
            created = await self._run(
                local.create,
                name,
                dim=dim,
                metric=metric,
                index=index,
                model=model_name,
                params=params,
            )
        logger.info(
            "collection %s created: %s, %s, %s on %s", name, model_name, index, metric, store
        )
        return Collection(await self._run(created.info), store)

    async def _names(self) -> set[str]:
        names: set[str] = set()
        local = await self._existing_local()
        if local is not None:
            names.update(local.names())
        if self._milvus is not None or self.settings.milvus_uri is not None:
            names.update(s.name for s in await self._run(self._milvus_catalog().specs))
        return names

    async def _find(self, name: str) -> tuple[VectorStore, StoreKind]:
        local = await self._existing_local()
        if local is not None and name in local:
            return await self._run(local.get, name), "local"
        if self.settings.milvus_uri is not None:
            catalog = self._milvus_catalog()
            with contextlib.suppress(CollectionNotFoundError):
                return await self._run(catalog.get, name), "milvus"
        if local is not None:
            await self._run(local.get, name)  # a broken one says why
        raise CollectionNotFoundError(name, known=sorted(await self._names()))

    async def get(self, name: str) -> Collection:
        store, kind = await self._find(name)
        return Collection(await self._run(store.info), kind)

    async def all(self) -> list[Collection]:
        found: list[Collection] = []
        store: VectorStore
        local = await self._existing_local()
        if local is not None:
            for spec in local.specs():
                store = await self._run(local.get, spec.name)
                found.append(Collection(await self._run(store.info), "local"))
        if self.settings.milvus_uri is not None:
            catalog = self._milvus_catalog()
            for spec in await self._run(catalog.specs):
                store = await self._run(catalog.get, spec.name)
                found.append(Collection(await self._run(store.info), "milvus"))
        return sorted(found, key=lambda c: c.info.name)

    async def delete(self, name: str) -> None:
        _, kind = await self._find(name)
        if kind == "local":
            assert self._local is not None
            await self._run(self._local.delete, name)
        else:
            await self._run(self._milvus_catalog().delete, name)
        logger.info("collection %s deleted", name)

    # --- items and queries ---------------------------------------------------------------------

    def _model_of(self, store: VectorStore) -> str:
        model = store.spec.model
        if model is None:
            raise InvalidInputError(f"collection '{store.spec.name}' has no model to embed with")
        try:
            self._core.registry.spec(model)
        except ModelNotFoundError:
            raise InvalidInputError(
                f"collection '{store.spec.name}' was built with model '{model}', which is no "
                "longer in the registry: restore it, or create a new collection",
                detail={"collection": store.spec.name, "model": model},
            ) from None
        return model

    async def add(
        self, name: str, items: Sequence[Item], *, client: str | None = None
    ) -> AddResult:
        """Embed ``items`` with the collection's model and upsert those that embedded; an item
        that fails is left out, with its error."""
        store, _ = await self._find(name)
        model = self._model_of(store)
        ids = [item.id for item in items]
        if len(set(ids)) != len(ids):
            raise InvalidInputError("item ids must be distinct within a request")
        dim = store.spec.dim
        outcomes: list[np.ndarray | ClipServeError] = [
            _given_vector(item.content, dim) if isinstance(item.content, np.ndarray) else _PENDING
            for item in items
        ]
        todo = [i for i, item in enumerate(items) if isinstance(item.content, Content)]
        if todo:
            contents = [c for c in (items[i].content for i in todo) if isinstance(c, Content)]
            embedded = await self._encode(model, contents, client)
            for i, outcome in zip(todo, embedded, strict=True):
                outcomes[i] = outcome
        good = {i: o for i, o in enumerate(outcomes) if not isinstance(o, ClipServeError)}
        rows = list(good)
        errors = tuple(
            (i, items[i].id, o) for i, o in enumerate(outcomes) if isinstance(o, ClipServeError)
        )
        if rows:
            vectors = np.stack(list(good.values())).astype(np.float32, copy=False)
            await self._run(
                store.add, [ids[i] for i in rows], vectors, [items[i].metadata for i in rows]
            )
        return AddResult(name, len(rows), errors)

    async def _encode(
        self, model: str, contents: Sequence[Content], client: str | None
    ) -> list[np.ndarray | ClipServeError]:
        core = self._core
        refs = image_refs(core, contents, lambda i: f"items[{i}]")
        scope = core.scope(None, client)
        async with core.serving(model, modalities_of(contents), scope) as handle:
            outcomes = await self._embedding.encode(handle, contents, refs, scope)
        return [o if isinstance(o, ClipServeError) else o.vector.numpy() for o in outcomes]

    async def delete_item(self, name: str, item_id: str) -> bool:
        store, _ = await self._find(name)
        return bool(await self._run(store.delete, [item_id]))

    async def search(
        self,
        name: str,
        *,
        text: str | None = None,
        image: Any = None,
        text_weight: float = 0.5,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
        client: str | None = None,
    ) -> SearchResult:
        """The ``top_k`` items nearest to the query: a text, an image, or both, combined as
        ``w·text + (1 - w)·image`` of their normalised embeddings (then normalised again)."""
        store, _ = await self._find(name)
        model = self._model_of(store)
        contents: list[Content] = []
        if text is not None:
            contents.append(Content.text(text))
        if image is not None:
            contents.append(Content.image(image))
        if not contents:
            raise InvalidInputError("a search needs a text, an image, or both")
        if not 0.0 <= text_weight <= 1.0:
            raise InvalidInputError("text_weight is between 0 and 1")
        where = ["text", "image"] if len(contents) == 2 else ["text" if text else "image"]
        embedded = await self._embedding.run(
            model, contents, where=lambda i: where[i], client=client
        )
        vectors = embedded.vectors
        if len(contents) == 2:
            query = text_weight * vectors[0] + (1.0 - text_weight) * vectors[1]
            query /= max(float(np.linalg.norm(query)), 1e-12)
        else:
            query = vectors[0]
        hits = await self._run(store.search, query, top_k, filter)
        return SearchResult(name, model, hits)
