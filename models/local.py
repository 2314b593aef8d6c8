"""The engine in this process: the `EngineClient` that the API uses when it runs the models itself.

It puts the parts together: the registry, the pipeline cache, the worker thread that owns the device, the result
cache, and the recorder that writes every job and image to the database. Blocking work (the database, the
registry file, hashing input images) runs in threads; pipeline work runs on the worker thread, between jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from models import metrics
from models.engine.device import select_device
from models.engine.families import check_for_family, check_refiner
from models.engine.generate import check_request
from models.engine.pipelines import PipelineCache
from models.engine.schedulers import scheduler_names
from models.engine.worker import GenerationWorker, Job
from models.errors import ControlNetNotFound, ImageNotFound, JobCancelled, JobFinished, JobNotFound
from models.families import family_named
from models.jobs.recorder import JobRecorder
from models.jobs.records import image_path, image_snapshot, snapshot_from_record
from models.jobs.results import ResultCache, cache_key
from models.jobs.store import Store
from models.registry import BASE_KINDS, Registry, RegistryEntry
from models.registry.access import RegistryAccess
from models.settings import Settings
from models.system_stats import system_stats
from models.types import (
    MAX_SEED,
    ControlNetInfo,
    EngineHealth,
    GenerationRequest,
    ImageSnapshot,
    JobEvent,
    JobOptions,
    JobSnapshot,
    JobStatus,
    LoraInfo,
    LoraSpec,
    ModelState,
    Page,
)

logger = logging.getLogger(__name__)

INTERRUPTED_REASON = "the server stopped before this job finished"
T = TypeVar("T")


class LocalEngine:
    def __init__(self, settings: Settings, name: str | None = None):
        """`name`: this engine's name among replicas sharing one database (Ray Serve); its rows carry it, and at
        start-up it marks only its own unfinished jobs interrupted. None (one process): every unfinished job."""
        self.settings = settings
        self.name = name
        self._registry = Registry(settings.registry_path)
        self._access = RegistryAccess(self._registry, settings)  # listings with families, checked changes
        self._families = self._access.families
        self.device = select_device(settings)
        self.cache = PipelineCache(settings, self._registry, self.device)
        self.worker = GenerationWorker(settings, self.cache)
        self.store = Store(settings.resolved_database_url())
        interrupted = self.store.mark_interrupted(INTERRUPTED_REASON, engine=name)
        if interrupted:
            logger.warning("%d job(s) left unfinished by the last run are marked interrupted", interrupted)
        self.results = ResultCache(settings.result_cache_size)
        self._cache_keys: dict[str, str] = {}  # job id -> its result-cache key, until it finishes
        self.recorder = JobRecorder(self.store, settings, engine=name)
        job_metrics = metrics.JobMetrics()
        self.worker.add_observer(self._keep_result)
        self.worker.add_observer(self.recorder)
        self.worker.add_observer(lambda job, event: job_metrics(job.request.task, event))
        metrics.QUEUE_DEPTH.set_function(self.worker.queue_depth)
        metrics.QUEUE_CAPACITY.set(settings.queue_size)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.worker.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        self.worker.stop()
        self.recorder.close()  # after the worker: its last events (interrupted jobs) get written
        self.store.close()

    async def health(self) -> EngineHealth:
        return EngineHealth(
            state=self.worker.state,
            default_model=self.settings.default_model,
            loaded_models=self.cache.loaded_now,
            queue_depth=self.worker.queue_depth(),
            queue_capacity=self.settings.queue_size,
            device=self.device.describe(),
            schedulers=tuple(scheduler_names()),
            error=self.worker.startup_error,
        )

    # -- generation jobs --------------------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, options: JobOptions) -> JobSnapshot:
        # A thread: checking hashes the input images, and the registry may be re-read from disk.
        return await asyncio.to_thread(self._submit, request, options)

    def _submit(self, request: GenerationRequest, options: JobOptions) -> JobSnapshot:
        check_request(request, self.settings)
        model = request.model or self.settings.default_model
        entry = self._registry.get(model, kinds=BASE_KINDS)  # an unknown model is a 404 now, not a failed job later
        self._check_family(request, model, entry)
        seed_origin = "client" if request.seed is not None else "drawn"
        if request.seed is None:
            request = replace(request, seed=random.randint(0, MAX_SEED))
        job = Job(request=request, options=options, seed_origin=seed_origin, model=model)
        key = cache_key(request, model, self._registry.entries()) if seed_origin == "client" else None
        cached = self.results.get(key) if key and self.results.enabled else None
        if cached is not None:
            self.worker.add_finished(job, replace(cached, timings={"queued_s": 0.0, "inference_s": 0.0}))
        else:
            if key:
                self._cache_keys[job.id] = key
            self.worker.submit(job)
        return self._snapshot(job)

    def _check_family(self, request: GenerationRequest, model: str, entry: RegistryEntry) -> None:
        """What does not apply to the model's family is a 422 now, when its family can be told without loading
        it (else the worker checks once it is loaded). A refiner must be a registered SDXL model."""
        family = self._families.family(entry)
        if family is not None:
            check_for_family(request, family_named(family), model)
        if request.refiner is not None:
            refiner = self._registry.get(request.refiner, kinds=BASE_KINDS)
            refiner_family = self._families.family(refiner)
            check_refiner(request.refiner, model, family_named(refiner_family) if refiner_family else None)

    async def wait(self, job_id: str) -> JobSnapshot:
        job = self.worker.job(job_id)
        if job is None:
            return await self.job(job_id)
        await _finished(job)
        if job.status is JobStatus.succeeded:
            return self._snapshot(job)
        if job.status is JobStatus.cancelled:
            raise JobCancelled(job.error or "cancelled")
        error = job.future.exception()
        raise error if error is not None else JobCancelled(job.error or job.status.value)

    async def cancel(self, job_id: str, wait_s: float = 0.0) -> JobSnapshot:
        job = self.worker.job(job_id)
        if job is None:
            recorded = await self.job(job_id, with_result=False)
            raise JobFinished(f"job {job_id} is already {recorded.status.value}; nothing to cancel")
        if job.done:
            raise JobFinished(f"job {job_id} is already {job.status.value}; nothing to cancel")
        self.worker.cancel(job_id)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(_finished(job), wait_s)
        return self._snapshot(job)

    async def stop_early(self, job_id: str) -> JobSnapshot:
        job = self.worker.job(job_id)
        if job is None:
            recorded = await self.job(job_id, with_result=False)
            raise JobFinished(f"job {job_id} is already {recorded.status.value}; nothing to stop")
        if job.done:
            raise JobFinished(f"job {job_id} is already {job.status.value}; nothing to stop")
        self.worker.stop_early(job_id)
        return self._snapshot(job, with_result=False)

    async def saved_image_ids(self, job_id: str, timeout_s: float = 30.0) -> tuple[str, ...]:
        job = self.worker.job(job_id)
        if job is None:
            return (await self.job(job_id, with_result=False)).image_ids
        if not job.done or job.status is not JobStatus.succeeded or not self.recorder.saves(job):
            return ()
        # The recorder thread writes the files just after the job finished: wait for it, off the event loop.
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not job.image_ids and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return job.image_ids

    async def job(self, job_id: str, with_result: bool = True) -> JobSnapshot:
        job = self.worker.job(job_id)
        if job is not None:
            return self._snapshot(job, with_result)
        record = await asyncio.to_thread(self.store.get_job, job_id)
        if record is None:
            raise JobNotFound(job_id)
        return await asyncio.to_thread(snapshot_from_record, record, self.settings.output_dir, with_result)

    async def jobs(self, limit: int, offset: int, status: JobStatus | None = None) -> Page:
        records, total = await asyncio.to_thread(
            self.store.list_jobs, limit, offset, status.value if status else None
        )
        snapshots = []
        for record in records:
            live = self.worker.job(record.id)
            if live is not None and not live.done:  # the database has no per-step progress
                snapshots.append(self._snapshot(live, with_result=False))
            else:
                snapshots.append(snapshot_from_record(record, self.settings.output_dir, with_result=False))
        return Page(snapshots, total)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        job = self.worker.job(job_id)
        if job is None:
            yield _final_event(await self.job(job_id, with_result=False))
            return
        loop = asyncio.get_running_loop()
        incoming: asyncio.Queue[JobEvent] = asyncio.Queue()

        def listener(event: JobEvent) -> None:  # on the worker's (or a canceller's) thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: this client is long gone
                loop.call_soon_threadsafe(incoming.put_nowait, event)

        replay = job.subscribe(listener)
        try:
            for event in replay:
                yield event
            if replay and replay[-1].terminal:
                return
            while True:
                event = await incoming.get()
                yield event
                if event.terminal:
                    return
        finally:
            job.unsubscribe(listener)

    async def current_job(self) -> JobSnapshot | None:
        job = self.worker.current_job()
        return self._snapshot(job, with_result=False) if job is not None else None

    def _snapshot(self, job: Job, with_result: bool = True) -> JobSnapshot:
        return job.snapshot(self.worker.queue_position(job), with_result)

    def _keep_result(self, job: Job, event: JobEvent) -> None:
        if not event.terminal:
            return
        key = self._cache_keys.pop(job.id, None)
        # A job finished early (A1111's interrupt) made other pixels than its request asks for: not cached.
        if key and event.kind == "done" and job.result is not None and job.result.stopped_at_step is None:
            self.results.put(key, job.result)

    # -- saved images -------------------------------------------------------------------------------------------------
    async def images(self, limit: int, offset: int, model: str | None = None, prompt: str | None = None) -> Page:
        records, total = await asyncio.to_thread(self.store.list_images, limit, offset, model, prompt)
        return Page([image_snapshot(record) for record in records], total)

    async def image_file(self, image_id: str) -> tuple[ImageSnapshot, Path]:
        record = await asyncio.to_thread(self.store.get_image, image_id)
        if record is None:
            raise ImageNotFound(f"no image {image_id!r}")
        return image_snapshot(record), await asyncio.to_thread(image_path, self.settings.output_dir, record)

    # -- the registry -------------------------------------------------------------------------------------------------
    async def registry(self) -> dict[str, RegistryEntry]:
        return await asyncio.to_thread(self._access.entries)

    async def register(self, name: str, entry: RegistryEntry, replace: bool = False) -> RegistryEntry:
        registered = await asyncio.to_thread(self._access.register, name, entry, replace)
        if replace:
            await self.evict(name)  # a replaced base must be loaded again from its new source
        return registered

    async def unregister(self, name: str) -> None:
        await asyncio.to_thread(self._access.unregister, name)
        await self.evict(name)

    async def reload_registry(self) -> dict[str, RegistryEntry]:
        return await asyncio.to_thread(self._access.reload)

    # -- what is loaded (on the worker thread, between jobs) --------------------------------------------------------
    async def _on_worker(self, function: Callable[[PipelineCache], T]) -> T:
        return await asyncio.wrap_future(self.worker.call(function))

    async def pipeline_state(self) -> list[ModelState]:
        return await self._on_worker(PipelineCache.state)

    async def evict(self, name: str) -> bool:
        return await self._on_worker(lambda cache: cache.evict(name))

    async def preload_lora(self, model: str, spec: LoraSpec, adapter_name: str | None, scale: float | None) -> LoraInfo:
        return await self._on_worker(lambda cache: cache.preload_lora(model, spec, adapter_name, scale))

    async def unload_lora(self, name: str, model: str | None = None) -> dict[str, list[str]]:
        return await self._on_worker(lambda cache: cache.unload_lora(name, model))

    async def loaded_loras(self) -> dict[str, list[LoraInfo]]:
        return await self._on_worker(PipelineCache.loaded_loras)

    async def preloaded_lora_names(self, model: str) -> list[str]:
        return await self._on_worker(lambda cache: cache.preloaded_lora_names(model))

    async def preload_controlnet(self, source: str, name: str | None, check_model: str) -> ControlNetInfo:
        return await self._on_worker(lambda cache: cache.preload_controlnet(source, name, check_model))

    async def unload_controlnet(self, name: str) -> None:
        def unload(cache: PipelineCache) -> None:
            if not cache.controlnets.unload(name):
                loaded = ", ".join(info.name for info in cache.controlnets.loaded()) or "none"
                raise ControlNetNotFound(f"no ControlNet {name!r} is loaded; loaded: {loaded}")

        await self._on_worker(unload)

    async def loaded_controlnets(self) -> list[ControlNetInfo]:
        return await self._on_worker(lambda cache: cache.controlnets.loaded())

    async def latest_controlnet(self) -> str | None:
        return await self._on_worker(lambda cache: cache.controlnets.latest_preloaded())

    async def system_stats(self) -> dict[str, Any]:
        return await asyncio.to_thread(system_stats)


async def _finished(job: Job) -> None:
    """Until the job has finished. Never wraps the job's future itself: cancelling such a wrapper (a client that
    goes away) would cancel the future for the job's other waiters."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()

    def wake(_: object) -> None:  # on the worker's thread
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

    job.future.add_done_callback(wake)
    await finished


def _final_event(snapshot: JobSnapshot) -> JobEvent:
    """The one event that describes a job known only from the database (finished, or interrupted)."""
    kind = {"succeeded": "done", "cancelled": "cancelled"}.get(snapshot.status.value, "error")
    detail = None if kind == "done" else snapshot.error or snapshot.status.value
    return JobEvent(snapshot.id, kind, 1, snapshot.status, snapshot.finished_at or snapshot.created_at,  # type: ignore[arg-type]
                    detail=detail)
