"""The generation worker: the only thread that touches pipelines and the device.

Requests wait in a bounded queue (a full queue refuses at once); the worker takes the next job, with the
waiting jobs that can share its pipeline call (micro-batching: same model, task, size, steps, scheduler,
guidance, LoRAs), reports per-step progress on each job and honours each job's cancellation between steps.

Every change of a job is also an event (queued, started, progress, then exactly one of done, error or
cancelled). Listeners subscribe per job (a progress stream) or per worker (observers: the database recorder,
metrics); they are called on the thread that caused the event, in order, and must return at once.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any

from models.engine import device_memory
from models.engine.families import check_for_family, check_refiner
from models.engine.generate import Refiner, batch_key, check_request, generate_batch
from models.engine.pipelines import LoadedModel, PipelineCache
from models.engine.previews import LatentPreviewer
from models.errors import JobCancelled, NotReady, QueueFull, SdserveError
from models.logcontext import current_request_id, log_context
from models.settings import Settings
from models.types import (
    EngineState,
    GenerationRequest,
    GenerationResult,
    JobEvent,
    JobOptions,
    JobSnapshot,
    JobStatus,
    SeedOrigin,
)

logger = logging.getLogger(__name__)

FINISHED_JOBS_KEPT = 500

JobListener = Callable[[JobEvent], None]
JobObserver = Callable[["Job", JobEvent], None]


@dataclass
class Job:
    """A generation while the worker knows it: its request (seed drawn), its state, and its event stream."""

    request: GenerationRequest
    options: JobOptions
    seed_origin: SeedOrigin
    model: str  # the registry name it runs on (the default model when the request named none)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    status: JobStatus = JobStatus.queued
    step: int = 0
    total_steps: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    cached: bool = False
    image_ids: tuple[str, ...] = ()  # set by the recorder once the files are written
    future: Future[GenerationResult] = field(default_factory=Future, repr=False)
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    # Finish at the next step with the image so far (A1111's interrupt), rather than cancel.
    stop_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    request_id: str | None = field(default_factory=current_request_id)
    result: GenerationResult | None = field(default=None, repr=False)
    _event_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _listeners: list[JobListener] = field(default_factory=list, init=False, repr=False)
    _observers: list[JobObserver] = field(default_factory=list, init=False, repr=False)
    _latest: dict[str, JobEvent] = field(default_factory=dict, init=False, repr=False)
    _seq: int = field(default=0, init=False, repr=False)

    @property
    def done(self) -> bool:
        return self.status.finished

    @property
    def watched(self) -> bool:
        """Someone follows this job's progress (worth drawing previews for)."""
        return bool(self._listeners)

    def snapshot(self, queue_position: int | None = None, with_result: bool = True) -> JobSnapshot:
        return JobSnapshot(
            id=self.id, task=self.request.task, status=self.status, prompt=self.request.prompt,
            negative_prompt=self.request.negative_prompt, model=self.result.model if self.result else self.model,
            options=self.options, seed_origin=self.seed_origin, created_at=self.created_at,
            started_at=self.started_at, finished_at=self.finished_at, queue_position=queue_position,
            step=self.step, total_steps=self.total_steps, error=self.error, cached=self.cached,
            cancel_requested=self.cancel_requested.is_set() and not self.done, image_ids=self.image_ids,
            result=self.result if with_result else None,
        )

    def emit(self, kind: str, **fields: Any) -> JobEvent | None:
        """Record an event and tell every observer and listener, in order. Nothing follows a terminal event."""
        with self._event_lock:
            if "terminal" in self._latest:
                return None
            self._seq += 1
            event = JobEvent(self.id, kind, self._seq, self.status, time.time(), **fields)  # type: ignore[arg-type]
            self._latest["terminal" if event.terminal else kind] = event
            for observer in self._observers:
                _call_safely(observer, self, event)
            for listener in self._listeners:
                _call_safely(listener, event)
            return event

    def subscribe(self, listener: JobListener) -> list[JobEvent]:
        """Follow this job; returns the events that describe its current state, to replay before new ones.

        Queued: [queued]. Running: [started, latest progress]. Finished: [done | error | cancelled].
        Taken under the same lock as emit, so nothing is missed or seen twice between replay and live events.
        """
        with self._event_lock:
            if "terminal" in self._latest:
                return [self._latest["terminal"]]
            self._listeners.append(listener)
            if "started" in self._latest:
                return [self._latest[kind] for kind in ("started", "progress") if kind in self._latest]
            return [self._latest["queued"]] if "queued" in self._latest else []

    def unsubscribe(self, listener: JobListener) -> None:
        with self._event_lock:
            if listener in self._listeners:
                self._listeners.remove(listener)


def _call_safely(function: Callable[..., None], *arguments: Any) -> None:
    try:
        function(*arguments)
    except Exception:
        logger.exception("a job event listener failed; the job goes on")


@dataclass
class _Call:
    """A function to run on the worker thread between jobs (load an adapter, read pipeline state)."""

    function: Callable[[PipelineCache], Any]
    future: Future[Any] = field(default_factory=Future)


class GenerationWorker:
    def __init__(self, settings: Settings, cache: PipelineCache):
        self.settings = settings
        self.cache = cache
        self.state = EngineState.starting
        self.startup_error: str | None = None
        self._condition = threading.Condition()
        self._pending: deque[Job | _Call] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._running: list[Job] = []  # the jobs of the pipeline call in progress
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self._recent_seconds: deque[float] = deque(maxlen=20)
        self._observers: list[JobObserver] = []
        self._previewer = LatentPreviewer()

    # -- public, called from any thread --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._condition:
            self._stopping = True
            for item in self._pending:
                if isinstance(item, Job):
                    self._finish(item, JobStatus.interrupted, error="the server is shutting down",
                                 exception=NotReady("the server is shutting down"))
                else:
                    item.future.set_exception(NotReady("the server is shutting down"))
            self._pending.clear()
            for job in self._running:
                job.cancel_requested.set()
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.state = EngineState.stopped

    def add_observer(self, observer: JobObserver) -> None:
        """Call `observer(job, event)` for every event of every job from now on (quick, non-blocking)."""
        with self._condition:
            self._observers.append(observer)

    def submit(self, job: Job) -> Job:
        """Queue a job (its request's seed drawn); raises InvalidRequest, QueueFull, NotReady."""
        check_request(job.request, self.settings)
        job._observers = self._observers
        with self._condition:
            if self._stopping:
                raise NotReady("the server is shutting down")
            waiting = sum(isinstance(item, Job) for item in self._pending)
            if waiting >= self.settings.queue_size:
                raise QueueFull(waiting, self._retry_after(waiting))
            self._pending.append(job)
            self._remember(job)
            # Under the lock, so "queued" is always the first event, before the worker can start the job.
            job.emit("queued", position=waiting + 1)
            self._condition.notify()
        logger.info("job %s queued: %s on %s", job.id, job.request.task, job.model)
        return job

    def add_finished(self, job: Job, result: GenerationResult) -> Job:
        """A job answered without the device (the result cache): recorded and reported like any other."""
        job._observers = self._observers
        job.cached = True
        job.started_at = job.created_at
        job.step = job.total_steps = result.steps
        with self._condition:
            self._remember(job)
        self._finish(job, JobStatus.succeeded, result=result)
        logger.info("job %s answered from the result cache", job.id)
        return job

    def call(self, function: Callable[[PipelineCache], Any]) -> Future[Any]:
        """Run `function(cache)` on the worker thread before the next queued job."""
        call = _Call(function)
        with self._condition:
            if self._stopping:
                raise NotReady("the server is shutting down")
            self._pending.appendleft(call)
            self._condition.notify()
        return call.future

    def cancel(self, job_id: str) -> Job | None:
        """Cancel a queued job at once, or a running one at its next step. Returns None if unknown."""
        with self._condition:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return job
            job.cancel_requested.set()
            if job in self._pending:
                self._pending.remove(job)
                self._finish(job, JobStatus.cancelled, error="cancelled")
                self._announce_positions()
        logger.info("job %s cancel requested", job_id)
        return job

    def stop_early(self, job_id: str) -> Job | None:
        """Finish a running job at its next step with what it has made so far; a queued one is cancelled (it has
        made nothing). Returns None if unknown."""
        with self._condition:
            job = self._jobs.get(job_id)
            if job is None or job.done:
                return job
            running = job in self._running
        if not running:
            return self.cancel(job_id)
        job.stop_requested.set()
        logger.info("job %s asked to finish early", job_id)
        return job

    def job(self, job_id: str) -> Job | None:
        with self._condition:
            return self._jobs.get(job_id)

    def queue_position(self, job: Job) -> int | None:
        """0 for a running job, 1 for the next one, and so on; None once it has finished."""
        with self._condition:
            if job in self._running and not job.done:
                return 0
            jobs = [item for item in self._pending if isinstance(item, Job)]
            return jobs.index(job) + 1 if job in jobs else None

    def current_job(self) -> Job | None:
        """The first running job (several run at once when they share a batch)."""
        with self._condition:
            return next((job for job in self._running if not job.done), None)

    def queue_depth(self) -> int:
        with self._condition:
            return sum(isinstance(item, Job) for item in self._pending)

    # -- the worker thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        self._preload()
        while True:
            with self._condition:
                while not self._pending and not self._stopping:
                    self._condition.wait()
                if self._stopping:
                    return
                item = self._pending.popleft()
                if isinstance(item, Job):
                    self._running = self._take_batch(item)
                    self._announce_positions()
            if isinstance(item, _Call):
                self._run_call(item)
            else:
                with log_context(request_id=item.request_id, job_id=",".join(job.id for job in self._running)):
                    self._run_jobs(self._running)
                with self._condition:
                    self._running = []

    def _take_batch(self, first: Job) -> list[Job]:
        """`first`, and the waiting jobs that can share its pipeline call (micro-batching): those already queued
        at once, then those arriving within SDSERVE_BATCH_WINDOW_MS, up to SDSERVE_BATCH_MAX_IMAGES images.
        Called with the condition held; waiting on it lets submitters in."""
        key = batch_key(first.request, first.model)
        limit = self.settings.batch_max_images
        batch, images = [first], first.request.num_images
        if key is None or images >= limit:
            return batch
        deadline = time.monotonic() + self.settings.batch_window_ms / 1000
        while True:
            for item in list(self._pending):
                fits = images + item.request.num_images <= limit if isinstance(item, Job) else False
                if fits and batch_key(item.request, item.model) == key:  # type: ignore[union-attr]
                    self._pending.remove(item)
                    batch.append(item)  # type: ignore[arg-type]
                    images += item.request.num_images  # type: ignore[union-attr]
            remaining = deadline - time.monotonic()
            if images >= limit or remaining <= 0 or self._stopping:
                return batch
            self._condition.wait(remaining)

    def _preload(self) -> None:
        if not self.settings.preload_default_model:
            self.state = EngineState.ready
            return
        self.state = EngineState.loading
        try:
            self.cache.get(self.settings.default_model, "text2img")
            self.state = EngineState.ready
        except SdserveError as error:
            # The server still starts: other models may work, and /health says what is wrong.
            self.startup_error = str(error)
            self.state = EngineState.failed
            logger.error("default model %r failed to load: %s", self.settings.default_model, error)

    def _run_call(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.function(self.cache))
        except BaseException as error:  # noqa: BLE001 - handed to the caller, who maps it
            call.future.set_exception(error)

    def _run_jobs(self, jobs: list[Job]) -> None:
        """One pipeline call for jobs that share a batch key (most often just one job)."""
        started = time.time()
        for job in jobs:
            job.status = JobStatus.running
            job.started_at = started
            job.emit("started")
        first = jobs[0].request
        try:
            controlnets = tuple(control.name for control in first.controlnets)
            pipeline, model = self.cache.get(jobs[0].model, first.task, controlnets=controlnets)
            second = self.cache.get(jobs[0].model, "img2img", controlnets=controlnets)[0] if first.hires else None
            # A request with a refiner runs alone (its batch key is None).
            refiner = self._refiner(jobs[0], model) if first.refiner is not None else None
            on_step, on_latents = self._progress_hooks(jobs, pipeline)
            device_memory.reset_peak()
            results = generate_batch(
                pipeline, model, [job.request for job in jobs], on_step, lambda: self._cancel_finished(jobs),
                on_latents=on_latents, second_pipeline=second,
                # A1111's interrupt: the images so far, once every job of the call asked for it.
                stop_early=lambda: all(job.stop_requested.is_set() for job in jobs if not job.done),
                refiner=refiner,
            )
            peak = device_memory.peak_mb()
            results = [replace(result, peak_memory_mb=peak) for result in results]
        except JobCancelled:
            if self._stopping:
                self._end_all(jobs, JobStatus.interrupted, "the server is shutting down",
                              NotReady("the server is shutting down"))
            else:
                self._end_all(jobs, JobStatus.cancelled, "cancelled")
            return
        except SdserveError as error:
            self._end_all(jobs, JobStatus.failed, str(error), error)
            return
        except Exception as error:
            logger.exception("jobs %s failed", ", ".join(job.id for job in jobs))
            self._end_all(jobs, JobStatus.failed, "internal error while generating; see the server log", error)
            return
        self._recent_seconds.append((time.time() - started) / len(jobs))
        for job, result in zip(jobs, results, strict=True):
            if job.done:  # cancelled while its batch went on for the others
                continue
            result.timings["queued_s"] = round(started - job.created_at, 4)
            self._finish(job, JobStatus.succeeded, result=result)
            logger.info("job %s done in %.2fs", job.id, result.timings["inference_s"])

    def _cancel_finished(self, jobs: list[Job]) -> bool:
        """Between steps: end each job whose cancel was asked for at once (the others' call goes on); True when
        none is left to run, which stops the call."""
        for job in jobs:
            if job.cancel_requested.is_set() and not job.done and not self._stopping:
                self._finish(job, JobStatus.cancelled, error="cancelled")
        return all(job.done or job.cancel_requested.is_set() for job in jobs)

    def _end_all(self, jobs: list[Job], status: JobStatus, error: str, exception: BaseException | None = None) -> None:
        for job in jobs:
            if not job.done:
                self._finish(job, status, error=error, exception=exception)

    def _finish(
        self,
        job: Job,
        status: JobStatus,
        result: GenerationResult | None = None,
        error: str | None = None,
        exception: BaseException | None = None,
    ) -> None:
        job.status = status
        job.error = error
        job.finished_at = time.time()
        job.result = result
        # Before the future resolves, so observers (the result cache, the recorder) have seen the result by the
        # time a waiting client gets its answer.
        if status is JobStatus.succeeded:
            job.emit("done")
        elif status is JobStatus.cancelled:
            job.emit("cancelled", detail=error or "cancelled")
        else:
            job.emit("error", detail=error or "failed")
        if job.future.done():
            return
        if status is JobStatus.succeeded:
            job.future.set_result(result)  # type: ignore[arg-type]
        elif status is JobStatus.cancelled:
            job.future.set_exception(JobCancelled(error or "cancelled"))
        else:
            job.future.set_exception(exception or SdserveError(error or "failed"))

    def _refiner(self, job: Job, model: LoadedModel) -> Refiner:
        """The refiner's pipeline for the job's last steps (img2img, or inpainting for an inpainting job), loaded
        without unloading the job's base."""
        request = job.request
        assert request.refiner is not None
        check_for_family(request, model.family, model.name)  # the base takes a refiner, before loading one
        task = "inpainting" if request.task == "inpainting" else "img2img"
        pipeline, refiner = self.cache.get(request.refiner, task, keep=(job.model,))
        check_refiner(request.refiner, job.model, refiner.family)
        return pipeline, refiner

    def _progress_hooks(
        self, jobs: list[Job], pipeline: Any
    ) -> tuple[Callable[[int, int], None], Callable[[int, Any], None]]:
        """Step callbacks: every step a progress event for each job; every Nth step of a watched job, a preview
        of its own first image (its rows of the batch's latents)."""
        previews: dict[str, bytes] = {}
        offsets = [sum(job.request.num_images for job in jobs[:index]) for index in range(len(jobs))]

        def on_latents(step: int, latents: Any) -> None:
            every = self.settings.preview_every
            if not every or step % every:
                return
            for job, offset in zip(jobs, offsets, strict=True):
                if job.watched and not job.done:
                    jpeg = self._previewer.jpeg(pipeline, latents[offset:offset + job.request.num_images])
                    if jpeg is not None:
                        previews[job.id] = jpeg

        def on_step(step: int, total: int) -> None:
            for job in jobs:
                if not job.done:
                    job.step, job.total_steps = step, total
                    job.emit("progress", step=step, total_steps=total, preview=previews.pop(job.id, None))

        return on_step, on_latents

    def _announce_positions(self) -> None:
        """Tell each waiting job its new place in the queue (called with the condition held)."""
        waiting = [item for item in self._pending if isinstance(item, Job)]
        for position, job in enumerate(waiting, start=1):
            job.emit("queued", position=position)

    def _remember(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > FINISHED_JOBS_KEPT:
            oldest_id, oldest = next(iter(self._jobs.items()))
            if not oldest.done:
                break
            del self._jobs[oldest_id]

    def _retry_after(self, waiting: int) -> int:
        typical = sum(self._recent_seconds) / len(self._recent_seconds) if self._recent_seconds else 5.0
        return max(1, round(typical * waiting))
