"""The embedding cache: content-addressed, in-process (an LRU bounded in bytes) and optionally in
Redis (shared by replicas), behind one interface, :class:`EmbeddingCache`.

Keys (:class:`CacheKey`) hold the model's config name, its weights identity
(:func:`weights_identity`: the spec's weights, backend and precision, the dtype and device type it
runs in, the backend's shape and, for local weights, their files' sizes and times), the kind of
input (``text``, or ``image/<preprocess>``: the preprocessing mode changes the pixels) and the
sha256 of the input. An image's is the sha256 of its encoded bytes: a URL's fetched body (never
its address, which may serve other bytes tomorrow), a data URI's payload, a file's contents, the
bytes uploaded. A text's is the sha256 of its exact UTF-8: no case, whitespace or Unicode folding,
since tokenizers differ in what they fold and a cache must never change an answer. So a text never
meets image bytes, and two models, two preprocessing modes or two loads of different weights never
share a vector. PIL images (the in-process API) have no bytes: they are not cached.

Invalidation: a config change that reloads a model's weights (or its precision) changes its
identity, so neither tier serves the old vectors; when a model unloads, its entries leave the
in-process tier (:meth:`EmbeddingCache.forget`); Redis entries of an identity no longer served
expire after ``cache.redis_ttl_s``.

Values (:class:`CachedEmbedding`) are float32 vectors with a text's token count and truncation.
The Redis tier (:mod:`clipserve.engine.redis_cache`) holds them as a 16-byte header and the raw
little-endian float32s, never pickles.

Concurrency contract (everything runs on the event loop; no locks):

* single flight: concurrent lookups of one key compute it once. The first (the leader) registers
  a future, looks Redis up, computes; the others await that future, shielded, so a waiter that
  goes away never cancels it. Every such future is settled, whatever becomes of the leader:

  - on success the value goes to memory and to the waiters, then to Redis (the leader awaits the
    write, bounded by ``redis_timeout_s``);
  - a failure of the input (an image that does not decode, a model error) is not cached: the
    waiters get the same error (each its own copy);
  - a failure of the leader's request rather than of the input (it was cancelled: its client went
    away or its deadline passed; its queue share was full; its deadline passed in the queue)
    releases the waiters to look again: one of them becomes the next leader, under its own
    deadline;

* Redis never fails a request: an error, or a call slower than ``redis_timeout_s``, is a miss
  (logged and counted in ``clipserve_cache_errors_total``), after which Redis is left alone for
  :data:`~clipserve.engine.redis_cache.COOLDOWN_S`; at most
  :data:`~clipserve.engine.redis_cache.MAX_REDIS_CALLS` calls are in flight at once (beyond that a
  lookup is a miss and a write is skipped).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import os
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import numpy as np

from clipserve.config import CacheSettings
from clipserve.engine.registry import ModelHandle
from clipserve.errors import ClipServeError, InferenceTimeoutError, QueueFullError
from clipserve.model_specs import ModelSpec
from clipserve.models.base import BackendInfo
from clipserve.observability.context import note_cache_hit
from clipserve.observability.metrics import Metrics

KEY_VERSION: Final = "v1"
ENTRY_OVERHEAD_BYTES: Final = 256
"""What an in-process entry costs beyond its vector and key: the array header, the slot, the
ordered dict's node (an estimate, on the high side)."""
MAX_LOCAL_FILES: Final = 256
"""Files of a local weights folder whose sizes and times go into the weights identity."""

_LEADER_SPECIFIC: Final = (QueueFullError, InferenceTimeoutError, TimeoutError)
"""Failures of the leader's request, not of the input: waiters look again instead of sharing."""


@dataclass(frozen=True, slots=True)
class CachedEmbedding:
    """One input's embedding: a ``(d,)`` float32 vector that owns its memory (never a view of a
    batch; callers treat it as read-only), and for texts their token count and truncation."""

    vector: np.ndarray
    token_count: int = 0
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class CacheKey:
    model: str
    """The model's config name."""
    identity: str
    """Its weights identity (:func:`weights_identity`)."""
    kind: str
    """``text``, or ``image/<preprocess>``."""
    digest: str
    """sha256 (hex) of the input's bytes, or of the text's UTF-8."""

    @property
    def modality(self) -> str:
        return self.kind.partition("/")[0]

    def __str__(self) -> str:
        return f"{KEY_VERSION}:{self.model}:{self.identity}:{self.kind}:{self.digest}"


def text_digest(text: str) -> str:
    """The sha256 of the text's exact UTF-8 (texts reach the cache checked: no lone surrogates)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def weights_identity(spec: ModelSpec, info: BackendInfo) -> str:
    """What makes a model's vectors what they are, hashed: stable across processes (replicas
    sharing Redis agree on it), different when the weights, precision or backend change."""
    fields = {
        "model_name": spec.model_name,
        "pretrained": spec.pretrained,
        "backend": spec.backend,
        "precision": spec.precision,
        "dtype": info.dtype,
        "device": info.device.partition(":")[0],
        "architecture": info.architecture,
        "embed_dim": info.embed_dim,
        "context_length": info.context_length,
        "image_size": info.image_size,
        "parameters": info.parameter_count,
        "extra": dict(info.extra),
        "files": [_local_files(source) for source in (spec.model_name, spec.pretrained)],
    }
    encoded = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def _local_files(source: str | None) -> list[tuple[str, int, int]]:
    """Name, size and mtime of a local weights file, or of the files in a local weights folder
    (the folder's own entries: where the weights and configs lie); [] for anything else."""
    if not source:
        return []
    path_text = source.removeprefix("local-dir:")
    if path_text == source and not (os.sep in source or source.startswith((".", "~"))):
        return []  # an architecture, a tag or a hub id, not a path
    try:
        path = Path(path_text).expanduser()
        if path.is_file():
            stat = path.stat()
            return [(path.name, stat.st_size, stat.st_mtime_ns)]
        if not path.is_dir():
            return []
        with os.scandir(path) as entries:
            files = sorted(
                (e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()
            )
    except OSError:
        return []
    return files[:MAX_LOCAL_FILES]


class CacheTier(Protocol):
    """One tier of the cache. ``get`` and ``put`` never raise for the tier's own failures."""

    name: str
    """The metric label: memory, redis."""

    async def get(self, key: CacheKey) -> CachedEmbedding | None: ...

    async def put(self, key: CacheKey, value: CachedEmbedding) -> None: ...

    def forget(self, model: str) -> None:
        """Drop what the tier holds of ``model`` (where it can)."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Slot:
    model: str
    value: CachedEmbedding
    size: int


class MemoryCache:
    """An LRU bounded in bytes (vectors, keys and :data:`ENTRY_OVERHEAD_BYTES` each): storing
    evicts the least recently used entries until the total fits ``max_bytes``."""

    name = "memory"

    def __init__(self, max_bytes: int, metrics: Metrics | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._metrics = metrics
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def lookup(self, key: str) -> CachedEmbedding | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        self._slots.move_to_end(key)
        return slot.value

    def store(self, key: CacheKey, value: CachedEmbedding) -> None:
        text = str(key)
        size = int(value.vector.nbytes) + len(text) + ENTRY_OVERHEAD_BYTES
        self._remove(text)
        if size <= self.max_bytes:
            self._slots[text] = _Slot(key.model, value, size)
            self.bytes += size
        evicted = 0
        while self.bytes > self.max_bytes:
            _, slot = self._slots.popitem(last=False)
            self.bytes -= slot.size
            evicted += 1
        if self._metrics is not None and evicted:
            self._metrics.cache_evictions_total.inc(evicted)
        self._publish()

    async def get(self, key: CacheKey) -> CachedEmbedding | None:
        return self.lookup(str(key))

    async def put(self, key: CacheKey, value: CachedEmbedding) -> None:
        self.store(key, value)

    def forget(self, model: str) -> None:
        for text in [text for text, slot in self._slots.items() if slot.model == model]:
            self._remove(text)
        self._publish()

    async def close(self) -> None:
        self._slots.clear()
        self.bytes = 0
        self._publish()

    def _remove(self, text: str) -> None:
        slot = self._slots.pop(text, None)
        if slot is not None:
            self.bytes -= slot.size

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.cache_bytes.set(self.bytes)
            self._metrics.cache_entries.set(len(self._slots))


def _release(future: asyncio.Future[CachedEmbedding | None]) -> None:
    """Tell the waiters to look again (the leader's request failed, not the input)."""
    if not future.done():
        future.set_result(None)


def _fail(future: asyncio.Future[CachedEmbedding | None], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
        future.exception()  # retrieved: no "never retrieved" warning when nobody waits


def _copied(exc: ClipServeError) -> ClipServeError:
    try:
        return copy.copy(exc)
    except Exception:  # an error class that cannot be rebuilt from its args: shared as it is
        return exc


class EmbeddingCache:
    """The cache the encoder uses: an in-process tier and a shared one (either may be absent),
    single flight, and the hit and miss counts. See the module's concurrency contract."""

    def __init__(
        self, *, memory: MemoryCache | None, remote: CacheTier | None, metrics: Metrics
    ) -> None:
        self.memory = memory
        self.remote = remote
        self._metrics = metrics
        self._inflight: dict[str, asyncio.Future[CachedEmbedding | None]] = {}
        self._waiters = 0
        self._identities: weakref.WeakKeyDictionary[ModelHandle, str] = weakref.WeakKeyDictionary()

    @classmethod
    def from_settings(cls, settings: CacheSettings, metrics: Metrics) -> EmbeddingCache | None:
        """The cache ``settings`` describe; None when it is off (or has no tier)."""
        if not settings.enabled or (settings.max_bytes == 0 and settings.redis_url is None):
            return None
        memory = MemoryCache(settings.max_bytes, metrics) if settings.max_bytes > 0 else None
        remote = None
        if settings.redis_url is not None:
            from clipserve.engine.redis_cache import RedisCache  # redis only where it is used

            remote = RedisCache(
                settings.redis_url,
                metrics=metrics,
                ttl_s=settings.redis_ttl_s,
                timeout_s=settings.redis_timeout_s,
                prefix=settings.redis_prefix,
            )
        return cls(memory=memory, remote=remote, metrics=metrics)

    def identity(self, handle: ModelHandle) -> str:
        """The weights identity of a loaded model, computed once per load."""
        identity = self._identities.get(handle)
        if identity is None:
            identity = self._identities[handle] = weights_identity(handle.spec, handle.info)
        return identity

    def key(self, handle: ModelHandle, kind: str, digest: str) -> CacheKey:
        return CacheKey(handle.name, self.identity(handle), kind, digest)

    def in_flight(self) -> int:
        """Keys being computed now (for tests and diagnostics)."""
        return len(self._inflight)

    def waiters(self) -> int:
        """Lookups waiting for another's computation now (for tests and diagnostics)."""
        return self._waiters

    async def get_or_compute(
        self, key: CacheKey, compute: Callable[[], Awaitable[CachedEmbedding]]
    ) -> CachedEmbedding:
        """The cached embedding of ``key``, or what ``compute`` makes of it (once, however many
        ask at the same time); ``compute``'s errors propagate and are not cached."""
        name = str(key)
        while True:
            if self.memory is not None:
                hit = self.memory.lookup(name)
                if hit is not None:
                    self._count("hits", key, "memory")
                    return hit
            pending = self._inflight.get(name)
            if pending is None:
                return await self._lead(key, name, compute)
            self._waiters += 1
            try:
                shared = await asyncio.shield(pending)
            except ClipServeError as exc:  # a copy: each request may name it its own way
                raise _copied(exc) from None
            finally:
                self._waiters -= 1
            if shared is not None:
                self._count("hits", key, "inflight")
                return shared
            # The leader's request failed or went away: look again (maybe lead).

    async def _lead(
        self, key: CacheKey, name: str, compute: Callable[[], Awaitable[CachedEmbedding]]
    ) -> CachedEmbedding:
        future: asyncio.Future[CachedEmbedding | None] = asyncio.get_running_loop().create_future()
        self._inflight[name] = future
        computed = False
        try:
            if self.memory is not None:
                self._count("misses", key, "memory")
            value = None
            if self.remote is not None:
                value = await self.remote.get(key)
                self._count("misses" if value is None else "hits", key, self.remote.name)
            if value is None:
                value = await compute()
                computed = True
        except asyncio.CancelledError:
            _release(future)
            raise
        except _LEADER_SPECIFIC:
            _release(future)
            raise
        except BaseException as exc:
            _fail(future, exc)
            raise
        else:
            if self.memory is not None:
                self.memory.store(key, value)
            future.set_result(value)
        finally:
            if self._inflight.get(name) is future:
                del self._inflight[name]
        if computed and self.remote is not None:
            await self.remote.put(key, value)
        return value

    def forget(self, model: str) -> None:
        """Drop the in-process entries of ``model`` (it unloaded: a reload, a config change)."""
        if self.memory is not None:
            self.memory.forget(model)
        if self.remote is not None:
            self.remote.forget(model)

    async def close(self) -> None:
        if self.memory is not None:
            await self.memory.close()
        if self.remote is not None:
            await self.remote.close()

    def _count(self, what: str, key: CacheKey, tier: str) -> None:
        """Count a hit or a miss in the metrics, and a hit in the request's access line."""
        if what == "hits":
            note_cache_hit()
            counter = self._metrics.cache_hits_total
        else:
            counter = self._metrics.cache_misses_total
        counter.labels(key.model, key.modality, tier).inc()
