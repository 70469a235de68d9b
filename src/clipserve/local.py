"""The synchronous Python API: the same engine as the service, without a server.

>>> import clipserve
>>> with clipserve.load_model("fast") as model:           # doctest: +SKIP
...     model.score(["cat.jpg"], ["a photo of a cat"])     # [31.2]
...     model.embed_texts(["a cat", "a dog"]).shape       # (2, 512)

The engine is asynchronous; a ``LocalModel`` runs it on a private event loop in a background thread,
so it works from plain scripts and notebooks alike (even where a loop is already running).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from clipserve.config import Settings
from clipserve.engine.core import prefetch_window
from clipserve.engine.engine import Engine
from clipserve.engine.registry import BackendLoader, ModelStatus
from clipserve.engine.tasks.embed import Content, Embeddings
from clipserve.engine.tasks.evaluate import EvalItem, EvalResult
from clipserve.engine.tasks.search import AddResult, Collection, Item, StoreKind
from clipserve.errors import InvalidInputError
from clipserve.index import Hit, IndexKind, Metric
from clipserve.media import ImageInput

T = TypeVar("T")


class LocalModel:
    """One model of the registry, loaded in this process."""

    def __init__(
        self,
        name: str | None = None,
        *,
        settings: Settings | None = None,
        loader: BackendLoader | None = None,
    ) -> None:
        self._settings = settings if settings is not None else Settings()
        self.name = name or self._settings.default_model
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="clipserve-local", daemon=True
        )
        self._thread.start()
        self._engine: Engine | None = None
        try:
            self._engine = self._run(self._start(loader))
        except BaseException:
            self.close()
            raise

    async def _start(self, loader: BackendLoader | None) -> Engine:
        engine = Engine(self._settings, loader=loader)
        try:
            await engine.registry.get(self.name)  # load now: errors surface here, clearly
        except BaseException:
            await engine.close()
            raise
        return engine

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("this LocalModel is closed")
        return self._engine

    @property
    def status(self) -> ModelStatus:
        return self.engine.registry.status(self.name)

    def evaluate(
        self, images: Sequence[ImageInput], texts: Sequence[str], *, batch_size: int | None = None
    ) -> list[EvalResult]:
        """Score pair i = (images[i], texts[i]); failing pairs carry their error."""
        if len(images) != len(texts):
            raise InvalidInputError(f"got {len(images)} images but {len(texts)} texts")
        items = [
            EvalItem(image, text, self.name) for image, text in zip(images, texts, strict=True)
        ]
        return self._run(self.engine.evaluate(items, window=_window(batch_size)))

    def score(
        self, images: Sequence[ImageInput], texts: Sequence[str], *, batch_size: int | None = None
    ) -> list[float]:
        """CLIP scores of the pairs; raises the first pair's error, if any."""
        scores = []
        for result in self.evaluate(images, texts, batch_size=batch_size):
            if result.error is not None:
                raise result.error
            assert result.score is not None
            scores.append(result.score)
        return scores

    def embed_texts(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """(n, d) float32 L2-normalised text embeddings."""
        return self.embed_texts_detailed(texts, batch_size=batch_size).vectors

    def embed_texts_detailed(
        self, texts: Sequence[str], *, batch_size: int | None = None
    ) -> Embeddings:
        """Embeddings plus token counts and truncation flags."""
        return self._run(self.engine.embed_texts(self.name, texts, window=_window(batch_size)))

    def embed_images(
        self, images: Sequence[ImageInput], *, batch_size: int | None = None
    ) -> np.ndarray:
        """(n, d) float32 L2-normalised image embeddings (URLs, paths, data URIs, bytes, PIL)."""
        return self._run(self.engine.embed_images(self.name, images, window=_window(batch_size)))

    # --- collections (the same as /v1/collections) ------------------------------------------

    def create_collection(
        self,
        name: str,
        *,
        metric: Metric = "cosine",
        index: IndexKind = "flat",
        store: StoreKind = "local",
        params: Mapping[str, Any] | None = None,
    ) -> Collection:
        """A new empty collection of this model's embeddings (under ``collections.data_dir``,
        or on ``collections.milvus_uri`` with ``store="milvus"``)."""
        return self._run(
            self.engine.collections.create(
                name, model=self.name, metric=metric, index=index, store=store, params=params
            )
        )

    def add_to_collection(
        self,
        name: str,
        ids: Sequence[str],
        *,
        texts: Sequence[str] | None = None,
        images: Sequence[ImageInput] | None = None,
        metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> AddResult:
        """Embed ``texts`` or ``images`` (one per id) with the collection's model and add them;
        items that fail are in the result's ``errors``."""
        if (texts is None) == (images is None):
            raise InvalidInputError("give texts or images (one per id)")
        contents = [Content.text(t) for t in texts] if texts is not None else []
        contents += [Content.image(i) for i in images or ()]
        if len(contents) != len(ids) or (metadata is not None and len(metadata) != len(ids)):
            raise InvalidInputError(f"{len(ids)} ids need as many inputs and metadata")
        meta: Sequence[Mapping[str, Any]] = metadata or [{}] * len(ids)
        items = [Item(i, c, m) for i, c, m in zip(ids, contents, meta, strict=True)]
        return self._run(self._collections_ready(self.engine.collections.add(name, items)))

    def search(
        self,
        collection: str,
        *,
        text: str | None = None,
        image: ImageInput | None = None,
        text_weight: float = 0.5,
        top_k: int = 10,
        filter: Mapping[str, Any] | None = None,
    ) -> list[Hit]:
        """The ``top_k`` items of ``collection`` nearest to a text, an image or both."""
        found = self.engine.collections.search(
            collection, text=text, image=image, text_weight=text_weight, top_k=top_k, filter=filter
        )
        return self._run(self._collections_ready(found)).hits

    async def _collections_ready(self, work: Coroutine[Any, Any, T]) -> T:
        await self.engine.collections.start()  # opens the data directory if it exists
        return await work

    def close(self) -> None:
        if self._engine is not None:
            engine, self._engine = self._engine, None
            self._run(engine.close())
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        if not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> LocalModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_model(
    name: str | None = None,
    *,
    settings: Settings | None = None,
    loader: BackendLoader | None = None,
) -> LocalModel:
    """Load a model by its registry config name (default: the settings' default model).

    Raises :class:`clipserve.errors.ModelNotFoundError` or
    :class:`clipserve.errors.ModelUnavailableError` with the reason.
    """
    return LocalModel(name, settings=settings, loader=loader)


def _window(batch_size: int | None) -> int | None:
    """``batch_size`` (as in the service's batch API) sets how far ahead inputs are prepared."""
    return None if batch_size is None else prefetch_window(batch_size)
