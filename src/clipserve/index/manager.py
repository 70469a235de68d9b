"""Local collections under one data directory: create, list, get, delete, save, reload.

Layout::

    <data_dir>/
        .lock                 flock-ed by the one process that owns the directory
        <name>/               one collection (see clipserve.index.local and .snapshot)
        .new-<name>-<hex>/    a collection being created: renamed to <name> once complete
        .trash-<name>-<hex>/  a collection being deleted: renamed away first, then removed

Creating and deleting are atomic renames, so a crash leaves a collection either whole or
absent; leftovers are removed at start-up. Every collection is loaded when the manager starts;
one that cannot be loaded is reported by ``broken`` and by ``get`` (IndexBackendError) while
the others serve.

Thread-safety: all methods may be called from any thread; the collection map has one lock,
and each collection its own (see :mod:`clipserve.index.local`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from clipserve.errors import (
    CollectionConflictError,
    CollectionNotFoundError,
    IndexBackendError,
    InvalidInputError,
)
from clipserve.index.base import NAME_PATTERN, CollectionSpec, IndexKind, Metric
from clipserve.index.local import LocalVectorStore
from clipserve.index.snapshot import MANIFEST, fsync_dir
from clipserve.index.validation import check_spec

log = logging.getLogger(__name__)


class CollectionManager:
    def __init__(self, data_dir: Path | str) -> None:
        self._root = Path(data_dir)
        self._root.mkdir(parents=True, exist_ok=True)
        self._lock_file = _lock_directory(self._root)
        self._lock = threading.Lock()
        self._stores: dict[str, LocalVectorStore] = {}
        self._broken: dict[str, str] = {}
        self._closed = False
        self._load_all()

    def _load_all(self) -> None:
        for path in sorted(self._root.iterdir()):
            if path.name.startswith((".new-", ".trash-")):
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_dir() and NAME_PATTERN.match(path.name):
                if not (path / MANIFEST).exists():
                    log.warning("ignoring %s: no %s", path, MANIFEST)
                    continue
                try:
                    self._stores[path.name] = LocalVectorStore.open(path)
                except IndexBackendError as exc:
                    self._broken[path.name] = exc.message
        log.info("loaded %d collection(s) from %s", len(self._stores), self._root)

    @property
    def root(self) -> Path:
        return self._root

    @property
    def broken(self) -> dict[str, str]:
        """Collections that could not be loaded, with the reason."""
        with self._lock:
            return dict(self._broken)

    def create(
        self,
        name: str,
        *,
        dim: int,
        metric: Metric = "cosine",
        index: IndexKind = "flat",
        model: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> LocalVectorStore:
        spec = check_spec(name, dim, metric, index, model, params)
        if spec.index == "milvus":
            raise InvalidInputError("index 'milvus' is not local: use a Milvus catalog")
        with self._lock:
            self._check_open()
            final = self._root / name
            if name in self._stores or name in self._broken or final.exists():
                raise CollectionConflictError(name)
            tmp = self._root / f".new-{name}-{uuid.uuid4().hex[:12]}"
            tmp.mkdir()
            try:
                LocalVectorStore.initialize(tmp, spec)
                os.rename(tmp, final)
                fsync_dir(self._root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            store = LocalVectorStore.open(final)
            self._stores[name] = store
            return store

    def get(self, name: str) -> LocalVectorStore:
        with self._lock:
            self._check_open()
            store = self._stores.get(name)
            if store is not None:
                return store
            if name in self._broken:
                raise IndexBackendError(self._broken[name])
            raise CollectionNotFoundError(name, known=sorted(self._stores))

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._stores

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._stores)

    def specs(self) -> list[CollectionSpec]:
        with self._lock:
            return [self._stores[n].spec for n in sorted(self._stores)]

    def delete(self, name: str) -> None:
        """Remove the collection and its files; searches already running finish first."""
        with self._lock:
            self._check_open()
            store = self._stores.pop(name, None)
            if store is None and self._broken.pop(name, None) is None:
                raise CollectionNotFoundError(name, known=sorted(self._stores))
            trash = self._root / f".trash-{name}-{uuid.uuid4().hex[:12]}"
            if store is not None:
                store.close()
            os.rename(self._root / name, trash)
            fsync_dir(self._root)
        shutil.rmtree(trash, ignore_errors=True)

    def save_all(self) -> None:
        """Save every collection that changed (each one atomically)."""
        with self._lock:
            stores = list(self._stores.values())
        for store in stores:
            store.save()

    def close(self, *, save: bool = True) -> None:
        """Save (by default) and close every collection, and release the data directory."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            stores = list(self._stores.values())
            self._stores.clear()
        try:
            for store in stores:
                if save:
                    store.save()
                store.close()
        finally:
            self._lock_file.close()

    def _check_open(self) -> None:
        if self._closed:
            raise IndexBackendError("the collection manager is closed")

    def __enter__(self) -> CollectionManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _lock_directory(root: Path) -> Any:
    """Hold an exclusive flock on ``root/.lock`` for this process' lifetime (the kernel drops
    it if the process dies), so two servers never write one data directory."""
    handle = (root / ".lock").open("a+")
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.close()
        raise IndexBackendError(
            f"data directory {root} is in use by another clipserve process"
        ) from exc
    return handle
