"""Prometheus metrics on an explicit registry (never the global one), so many apps can coexist.

Names the API contract fixes (``http_requests_total``, ``clip_score_distribution``...) are kept
exactly; metrics of our own are prefixed ``clipserve_``.

With several workers (``clipserve serve --workers N``), ``PROMETHEUS_MULTIPROC_DIR`` (the seed's
name; ``serve`` sets and empties one) makes prometheus_client keep every value in memory-mapped
files there, and :meth:`Metrics.render` merges all workers' files, so one scrape, whichever
worker answers it, shows the whole server: counters and histograms summed, gauges by their
``multiprocess_mode`` (queue depths summed over live workers, load times the maximum, the last
batch's efficiency the most recent).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar, cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from clipserve.observability.window import RequestWindow

M = TypeVar("M", bound=MetricWrapperBase)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SCORE_BUCKETS = tuple(float(x) for x in range(0, 101, 5))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_MODEL_STATES = ("not_loaded", "loading", "loaded", "error")
_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
UNKNOWN_MODEL = "unknown"
"""The model label (and the access line's model) of names that are not in the registry: a name
a client chose must never become a label value."""


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.recent = RequestWindow()
        """Requests of the last five minutes (health and status report the error rate)."""
        self.before_scrape: list[Callable[[], None]] = []
        """Refresh the gauges that are a reading of now (queue ages, GPU memory)."""
        """Set when the values live in files shared by the workers (read by prometheus_client
        at import, so it is read here too, not through Settings)."""
        self._per_model: list[MetricWrapperBase] = []
        self.http_requests_total = self._add(
            Counter,
            "http_requests_total",
            "HTTP requests by method, route template and status code",
            ["method", "endpoint", "status"],
        )
        self.http_request_duration_seconds = self._add(
            Histogram,
            "http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "endpoint"],
            buckets=_LATENCY_BUCKETS,
        )
        self.clip_score_distribution = self._add(
            Histogram,
            "clip_score_distribution",
            "CLIP scores returned (0-100)",
            ["model"],
            buckets=_SCORE_BUCKETS,
        )
        self.inference_time_seconds = self._add(
            Histogram,
            "inference_time_seconds",
            "Duration of one forward pass (a batch) by model and modality",
            ["model", "modality"],
            buckets=_LATENCY_BUCKETS,
        )
        self.image_processing_time_seconds = self._add(
            Histogram,
            "image_processing_time_seconds",
            "Per-image fetch + decode + preprocess time by input source",
            ["source"],
            buckets=_LATENCY_BUCKETS,
        )
        self.model_load_time_seconds = self._add(
            Gauge,
            "model_load_time_seconds",
            "Seconds the last successful load of each model took",
            ["model"],
            multiprocess_mode="max",
        )
        self.model_warmup_time_seconds = self._add(
            Gauge,
            "clipserve_model_warmup_time_seconds",
            "Seconds the last successful warm-up (POST /api/v1/warmup) of each model took",
            ["model"],
            multiprocess_mode="max",
        )
        self.evaluation_errors_total = self._add(
            Counter,
            "evaluation_errors_total",
            "Failed evaluations (single or batch items) by model and error type",
            ["model", "error_type"],
        )
        self.batch_processing_efficiency = self._add(
            Gauge,
            "batch_processing_efficiency",
            "Items per second of the most recent batch evaluation request",
            multiprocess_mode="mostrecent",
        )
        self.forward_batch_size = self._add(
            Histogram,
            "clipserve_forward_batch_size",
            "Items per forward pass by model and modality",
            ["model", "modality"],
            buckets=_BATCH_BUCKETS,
        )
        self.evaluations_total = self._add(
            Counter,
            "clipserve_evaluations_total",
            "Image-text pairs evaluated successfully by model",
            ["model"],
        )
        self.model_state = self._add(
            Gauge,
            "clipserve_model_state",
            "1 for the current load state of each model config",
            ["model", "state"],
            multiprocess_mode="livemax",
        )

        # The dynamic batcher (names fixed by the API contract).
        self.batcher_requests_total = self._add(
            Counter,
            "batcher_requests_total",
            "Items submitted to the batcher by model, modality and outcome "
            "(ok, error, timeout, cancelled, rejected)",
            ["model", "modality", "outcome"],
        )
        self.batcher_request_latency_seconds = self._add(
            Histogram,
            "batcher_request_latency_seconds",
            "Seconds from an item's enqueue to its result",
            ["model", "modality"],
            buckets=_LATENCY_BUCKETS,
        )
        self.batcher_batch_size = self._add(
            Histogram,
            "batcher_batch_size",
            "Items per batch formed by the batcher",
            ["model", "modality"],
            buckets=_BATCH_BUCKETS,
        )
        self.batcher_batch_wait_time_seconds = self._add(
            Histogram,
            "batcher_batch_wait_time_seconds",
            "Seconds items waited in the queue before their batch started",
            ["model", "modality"],
            buckets=_WAIT_BUCKETS,
        )
        self.batcher_inference_time_seconds = self._add(
            Histogram,
            "batcher_inference_time_seconds",
            "Seconds one batch took on its device (preparation and forward pass)",
            ["model", "modality"],
            buckets=_LATENCY_BUCKETS,
        )
        self.batcher_queue_size = self._add(
            Gauge,
            "batcher_queue_size",
            "Items waiting in each batcher queue",
            ["model", "modality"],
            multiprocess_mode="livesum",
        )
        self.batcher_queue_capacity = self._add(
            Gauge,
            "batcher_queue_capacity",
            "Items each batcher queue may hold (max_queue_size); batcher_queue_size / "
            "batcher_queue_capacity is how full it is",
            ["model", "modality"],
            multiprocess_mode="livesum",
        )
        self.batcher_oldest_item_age_seconds = self._add(
            Gauge,
            "batcher_oldest_item_age_seconds",
            "How long the oldest item of each batcher queue has waited (at the last scrape)",
            ["model", "modality"],
            multiprocess_mode="livemax",
        )
        self.gpu_memory_bytes = self._add(
            Gauge,
            "clipserve_gpu_memory_bytes",
            "CUDA memory by device and kind (total, free, allocated, reserved), at the last scrape",
            ["device", "kind"],
            multiprocess_mode="livemax",
        )
        self.gpu_utilization_ratio = self._add(
            Gauge,
            "clipserve_gpu_utilization_ratio",
            "Share of the last sample period (1/6 s to 1 s) during which a kernel ran on each "
            "CUDA device (nvidia-smi's utilization.gpu / 100), at the last scrape; needs pynvml",
            ["device"],
            multiprocess_mode="livemax",
        )
        self.batcher_inflight_batches = self._add(
            Gauge,
            "batcher_inflight_batches",
            "Batches formed and not yet finished, per device",
            ["device"],
            multiprocess_mode="livesum",
        )

        self.rate_limit_storage_errors_total = self._add(
            Counter,
            "clipserve_rate_limit_storage_errors_total",
            "Requests let through because the rate-limit storage (Redis) failed",
        )

        # The embedding cache (clipserve.engine.cache). Every lookup is a memory hit, an
        # inflight hit (served by an identical computation already running) or a memory miss;
        # a memory miss with Redis configured is then a redis hit or a redis miss.
        self.cache_hits_total = self._add(
            Counter,
            "clipserve_cache_hits_total",
            "Embeddings served without computing them, by model, modality and tier "
            "(memory, redis, inflight)",
            ["model", "modality", "tier"],
        )
        self.cache_misses_total = self._add(
            Counter,
            "clipserve_cache_misses_total",
            "Embedding cache lookups that missed, by model, modality and tier (memory, redis)",
            ["model", "modality", "tier"],
        )
        self.cache_bytes = self._add(
            Gauge,
            "clipserve_cache_bytes",
            "Bytes held by the in-process embedding cache (summed over workers)",
            multiprocess_mode="livesum",
        )
        self.cache_entries = self._add(
            Gauge,
            "clipserve_cache_entries",
            "Embeddings held by the in-process embedding cache (summed over workers)",
            multiprocess_mode="livesum",
        )
        self.cache_evictions_total = self._add(
            Counter,
            "clipserve_cache_evictions_total",
            "Embeddings evicted from the in-process cache to stay within cache.max_bytes",
        )
        self.cache_errors_total = self._add(
            Counter,
            "clipserve_cache_errors_total",
            "Embedding cache calls that failed and were treated as misses, by tier and "
            "operation (get, put, decode)",
            ["tier", "operation"],
        )

    def _add(self, kind: type[M], name: str, documentation: str, *args: Any, **kwargs: Any) -> M:
        """Create a metric on this registry; those labelled by model are remembered so that
        :meth:`forget_model` can drop every series of a model."""
        metric = cast(M, kind(name, documentation, *args, registry=self.registry, **kwargs))
        labels = kwargs.get("labelnames", args[0] if args else ())
        if "model" in labels:
            self._per_model.append(metric)
        return metric

    def set_model_state(self, model: str, state: str) -> None:
        for candidate in _MODEL_STATES:
            self.model_state.labels(model=model, state=candidate).set(
                1.0 if candidate == state else 0.0
            )

    def forget_model(self, model: str) -> None:
        """Drop every series of a model that was unloaded (its state is published again by the
        registry while the name is still configured)."""
        for metric in self._per_model:
            metric.remove_by_labels({"model": model})

    def render(self) -> bytes:
        """The exposition: this registry, or with several workers every worker's files (the
        scrape-time gauges then as the answering worker read them now and the others at their
        last scrape)."""
        for refresh in self.before_scrape:
            refresh()
        if self.multiprocess_dir is None:
            return bytes(generate_latest(self.registry))
        merged = CollectorRegistry()
        MultiProcessCollector(merged, path=self.multiprocess_dir)
        return bytes(generate_latest(merged))
