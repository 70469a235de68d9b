"""Prometheus metrics on an explicit registry (never the global one), so many apps can coexist.

Names the API contract fixes (``http_requests_total``, ``clip_score_distribution``...) are kept
exactly; metrics of our own are prefixed ``clipserve_``.
"""

from __future__ import annotations

import contextlib

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SCORE_BUCKETS = tuple(float(x) for x in range(0, 101, 5))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_MODEL_STATES = ("not_loaded", "loading", "loaded", "error")
_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.http_requests_total = Counter(
            "http_requests_total",
            "HTTP requests by method, route template and status code",
            ["method", "endpoint", "status"],
            registry=r,
        )
        self.http_request_duration_seconds = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.clip_score_distribution = Histogram(
            "clip_score_distribution",
            "CLIP scores returned (0-100)",
            ["model"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.inference_time_seconds = Histogram(
            "inference_time_seconds",
            "Duration of one forward pass (a batch) by model and modality",
            ["model", "modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.image_processing_time_seconds = Histogram(
            "image_processing_time_seconds",
            "Per-image fetch + decode + preprocess time by input source",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.model_load_time_seconds = Gauge(
            "model_load_time_seconds",
            "Seconds the last successful load of each model took",
            ["model"],
            registry=r,
        )
        self.evaluation_errors_total = Counter(
            "evaluation_errors_total",
            "Failed evaluations (single or batch items) by model and error type",
            ["model", "error_type"],
            registry=r,
        )
        self.batch_processing_efficiency = Gauge(
            "batch_processing_efficiency",
            "Items per second of the most recent batch evaluation request",
            registry=r,
        )
        self.forward_batch_size = Histogram(
            "clipserve_forward_batch_size",
            "Items per forward pass by model and modality",
            ["model", "modality"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.evaluations_total = Counter(
            "clipserve_evaluations_total",
            "Image-text pairs evaluated successfully by model",
            ["model"],
            registry=r,
        )
        self.model_state = Gauge(
            "clipserve_model_state",
            "1 for the current load state of each model config",
            ["model", "state"],
            registry=r,
        )

        # The dynamic batcher (names fixed by the API contract).
        self.batcher_requests_total = Counter(
            "batcher_requests_total",
            "Items submitted to the batcher by model, modality and outcome "
            "(ok, error, timeout, cancelled, rejected)",
            ["model", "modality", "outcome"],
            registry=r,
        )
        self.batcher_request_latency_seconds = Histogram(
            "batcher_request_latency_seconds",
            "Seconds from an item's enqueue to its result",
            ["model", "modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batcher_batch_size = Histogram(
            "batcher_batch_size",
            "Items per batch formed by the batcher",
            ["model", "modality"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batcher_batch_wait_time_seconds = Histogram(
            "batcher_batch_wait_time_seconds",
            "Seconds items waited in the queue before their batch started",
            ["model", "modality"],
            buckets=_WAIT_BUCKETS,
            registry=r,
        )
        self.batcher_inference_time_seconds = Histogram(
            "batcher_inference_time_seconds",
            "Seconds one batch took on its device (preparation and forward pass)",
            ["model", "modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batcher_queue_size = Gauge(
            "batcher_queue_size",
            "Items waiting in each batcher queue",
            ["model", "modality"],
            registry=r,
        )
        self.batcher_inflight_batches = Gauge(
            "batcher_inflight_batches",
            "Batches formed and not yet finished, per device",
            ["device"],
            registry=r,
        )

        self.rate_limit_storage_errors_total = Counter(
            "clipserve_rate_limit_storage_errors_total",
            "Requests let through because the rate-limit storage (Redis) failed",
            registry=r,
        )

    def set_model_state(self, model: str, state: str) -> None:
        for candidate in _MODEL_STATES:
            self.model_state.labels(model=model, state=candidate).set(
                1.0 if candidate == state else 0.0
            )

    def forget_model(self, model: str) -> None:
        """Drop the per-model gauges of a model removed from the registry."""
        for candidate in _MODEL_STATES:
            with contextlib.suppress(KeyError):
                self.model_state.remove(model, candidate)
        with contextlib.suppress(KeyError):
            self.model_load_time_seconds.remove(model)
        for modality in ("text", "image"):
            with contextlib.suppress(KeyError):
                self.batcher_queue_size.remove(model, modality)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
