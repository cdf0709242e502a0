"""Prometheus metrics, exported at `GET /metrics`."""

from __future__ import annotations

import gc
import time

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

http_request_duration = Histogram(
    "aihub_http_request_duration_seconds",
    "Time from request start to the last byte of the response.",
    ["method", "route", "status"],
    buckets=_LATENCY_BUCKETS,
)
active_streams = Gauge("aihub_active_streams", "Streaming responses currently open.", ["product"])
time_to_first_token = Histogram(
    "aihub_time_to_first_token_seconds",
    "Time from request start to the first model output sent to the client.",
    ["product", "provider"],
    buckets=_LATENCY_BUCKETS,
)
provider_errors = Counter(
    "aihub_provider_errors_total", "Errors from model providers.", ["provider", "code"]
)
provider_requests = Counter(
    "aihub_provider_requests_total",
    "Provider calls by outcome: opened (output began) or failed (before any output).",
    ["provider", "outcome"],
)

_IMAGE_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300)
image_time_to_first_image = Histogram(
    "aihub_image_time_to_first_image_seconds",
    "Time from an image job's creation to its first finished image.",
    buckets=_IMAGE_BUCKETS,
)
image_batch_time = Histogram(
    "aihub_image_batch_seconds",
    "Time from an image job's creation to its last image.",
    buckets=_IMAGE_BUCKETS,
)
image_jobs = Counter("aihub_image_jobs_total", "Image jobs finished, by outcome.", ["outcome"])

gc_pauses = Histogram(
    "aihub_gc_pause_seconds",
    "Time the garbage collector held the process, every stream standing still, by generation.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)


class GCPauses:
    """Times each of the garbage collector's passes into `gc_pauses` while installed (a server
    process's lifetime): a pass stops the event loop, so its length is added to every stream's
    next chunk."""

    def __init__(self) -> None:
        self._generations = [gc_pauses.labels(str(generation)) for generation in range(3)]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._generations[info["generation"]].observe(time.perf_counter() - self._started)

    def install(self) -> None:
        gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
