"""Prometheus metrics of the engine: jobs, denoising throughput, model and adapter loads and switches.

The pipeline cache and the engine call the small functions below when things happen; jobs are counted from
their events (JobMetrics); the queue gauges read the worker at scrape time. GET /metrics (api/) renders the
default prometheus_client registry. Metric objects are process-wide, as prometheus_client intends: several apps
in one process (tests) add to the same counters, so tests compare before and after.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from models.types import JobEvent

PREFIX = "sdserve"
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

JOBS_SUBMITTED = Counter(f"{PREFIX}_jobs_submitted", "Generation jobs accepted into the queue.", ["task"])
JOBS_FINISHED = Counter(
    f"{PREFIX}_jobs_finished", "Generation jobs by the state they ended in.", ["status"]
)
JOBS_RUNNING = Gauge(f"{PREFIX}_jobs_running", "Generation jobs running on the device now.")
QUEUE_DEPTH = Gauge(f"{PREFIX}_queue_depth", "Generation jobs waiting for the device.")
QUEUE_CAPACITY = Gauge(f"{PREFIX}_queue_capacity", "Jobs the queue holds before answering 429 (SDSERVE_QUEUE_SIZE).")
JOB_SECONDS = Histogram(
    f"{PREFIX}_job_run_seconds", "Seconds from a job starting on the device to its end.", ["task"],
    buckets=SECONDS_BUCKETS,
)

DENOISING_STEPS = Counter(f"{PREFIX}_denoising_steps", "Denoising steps run, all jobs together.", ["model"])
STEPS_PER_SECOND = Gauge(
    f"{PREFIX}_denoising_steps_per_second", "Denoising speed of the latest job, updated at every step.", ["model"]
)

MODEL_LOADS = Counter(f"{PREFIX}_model_loads", "Base models loaded from disk.", ["model"])
MODEL_LOAD_SECONDS = Histogram(
    f"{PREFIX}_model_load_seconds", "Seconds to load a base model.", ["model"], buckets=SECONDS_BUCKETS
)
MODEL_SWITCHES = Counter(
    f"{PREFIX}_model_switches", "Times the worker used a different base model than the time before.", ["model"]
)
MODEL_EVICTIONS = Counter(f"{PREFIX}_model_evictions", "Base models unloaded (LRU, memory budget, edits).", ["model"])
MODELS_LOADED = Gauge(f"{PREFIX}_models_loaded", "Base models in memory now.")

ADAPTER_LOADS = Counter(f"{PREFIX}_adapter_loads", "Adapters (LoRA, ...) loaded from disk.", ["adapter"])
ADAPTER_SWITCHES = Counter(
    f"{PREFIX}_adapter_switches", "Times the active set of adapters on a pipeline changed."
)

# -- jobs ---------------------------------------------------------------------------------------------------------
class JobMetrics:
    """Counts jobs from their events (the engine calls it for every event of every job).

    Called on the thread that caused the event, under the job's event lock: it only touches counters.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, float] = {}  # job id -> when it started

    def __call__(self, task: str, event: JobEvent) -> None:
        if event.kind == "queued" and event.seq == 1:  # later `queued` events only move it up the queue
            JOBS_SUBMITTED.labels(task=task).inc()
        elif event.kind == "started":
            with self._lock:
                self._running[event.job_id] = event.at
                JOBS_RUNNING.set(len(self._running))
        elif event.terminal:
            JOBS_FINISHED.labels(status=event.status.value).inc()
            with self._lock:
                started_at = self._running.pop(event.job_id, None)
                JOBS_RUNNING.set(len(self._running))
            if started_at is not None:
                JOB_SECONDS.labels(task=task).observe(event.at - started_at)


# -- denoising ------------------------------------------------------------------------------------------------------
class StepMeter:
    """Wraps a per-step callback: counts steps and measures the speed between the first and the latest step.

    The first callback comes after step 1 has run, so the speed covers steps 2..n: text encoding, image
    encoding and decoding are not part of it.
    """

    def __init__(self, model: str, on_step: Callable[[int, int], None]):
        self._on_step = on_step
        self._steps = 0
        self._first_step_at: float | None = None
        self._counter = DENOISING_STEPS.labels(model=model)
        self._speed = STEPS_PER_SECOND.labels(model=model)

    def __call__(self, step: int, total: int) -> None:
        now = time.perf_counter()
        self._steps += 1
        self._counter.inc()
        if self._first_step_at is None:
            self._first_step_at = now
        elif now > self._first_step_at:
            self._speed.set((self._steps - 1) / (now - self._first_step_at))
        self._on_step(step, total)


# -- models and adapters -------------------------------------------------------------------------------------------
def model_loaded(model: str, seconds: float, loaded_count: int) -> None:
    MODEL_LOADS.labels(model=model).inc()
    MODEL_LOAD_SECONDS.labels(model=model).observe(seconds)
    MODELS_LOADED.set(loaded_count)


def model_evicted(model: str, loaded_count: int) -> None:
    MODEL_EVICTIONS.labels(model=model).inc()
    MODELS_LOADED.set(loaded_count)


def model_switched(to_model: str) -> None:
    MODEL_SWITCHES.labels(model=to_model).inc()


def adapter_loaded(adapter: str) -> None:
    """For the adapter code: call when a LoRA's weights are read from disk into a pipeline."""
    ADAPTER_LOADS.labels(adapter=adapter).inc()


def adapters_switched() -> None:
    """For the adapter code: call when `set_adapters` changes which adapters (or scales) are active."""
    ADAPTER_SWITCHES.inc()
