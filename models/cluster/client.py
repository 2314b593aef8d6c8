"""`RayEngine`: the engine interface (`EngineClient`) on Ray Serve, for the HTTP app in the ingress deployment.

Generation jobs run on engine replicas (models/cluster/replica.py), reached through one `DeploymentHandle`:
- `submit` opens one streaming call per job, routed by the request's model and LoRA set (Serve's multiplexed model
  id), and returns the job's first snapshot; a follower task then reads the stream (events, the finished snapshot)
  and keeps the job's live state here, so `job`, `wait`, `events` and `cancel` answer from this process.
- `cancel` cancels the job's call; the replica cancels the job at its next step and records it, and the follower
  reports the recorded end.
- A replica that dies mid-job (its call fails with an actor error) fails that job with `ReplicaLost`, recorded in the
  shared database; it is not retried (a job may have side effects a client saw: previews, progress).
- Finished jobs, listings and images are read from the shared database and output folder, so an ingress that
  restarts loses nothing that finished. The registry file is shared too: this process reads and writes it, and
  each replica notices a change the next time it is asked for a model.
- LoRA/ControlNet preloads, pipeline state and evictions act on the one replica Serve routes the call to (by model):
  they are per replica (README "Scaling out").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from models.cluster.routing import model_id, request_model_id
from models.errors import (
    ImageNotFound,
    JobCancelled,
    JobFinished,
    JobNotFound,
    NotReady,
    QueueFull,
    ReplicaLost,
    SdserveError,
)
from models.interface import EngineClient
from models.jobs.records import image_path, image_snapshot, snapshot_from_record
from models.jobs.store import Store
from models.registry import Registry, RegistryEntry
from models.registry.access import RegistryAccess
from models.settings import Settings
from models.types import (
    ControlNetInfo,
    EngineHealth,
    EngineState,
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

FINISHED_JOBS_KEPT = 100  # finished jobs answered from memory (with their images); older ones from the database
RECORD_POLL_S = 0.1
RECORD_WAIT_S = 60.0  # how long a cancelled job's replica may take to record its end
HEALTH_TIMEOUT_S = 3.0
HEALTH_KEPT_S = 60.0  # how long a replica's last health answer stands in for one that is busy
LOST_REASON = "the engine replica running this job stopped before it finished (its process died); " \
    "the job was not retried: submit it again"


class RayEngine(EngineClient):
    def __init__(self, replicas: DeploymentHandle, settings: Settings):
        self.settings = settings
        self._replicas = replicas
        # The same checks and listings as one process; replicas unload a changed model when next asked for it.
        self._access = RegistryAccess(Registry(settings.registry_path), settings)
        self.store = Store(settings.resolved_database_url())
        self._followers: OrderedDict[str, _Follower] = OrderedDict()
        self._last_health: tuple[float, EngineHealth | None] = (0.0, None)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        logger.info("engine: Ray Serve replicas behind %s", self._replicas.deployment_name)

    async def stop(self) -> None:
        """The followed calls end with this process: their replicas cancel the jobs, and record them."""
        for follower in list(self._followers.values()):
            follower.close()
        await asyncio.to_thread(self.store.close)

    async def health(self) -> EngineHealth:
        """One replica's health (the one Serve routes to). Replicas that are all busy (every slot holding a job)
        cannot answer at once: then the last answer stands while it is recent, so a loaded cluster stays ready."""
        try:
            health = await asyncio.wait_for(self._remote(self._replicas.health), HEALTH_TIMEOUT_S)
            self._last_health = (time.monotonic(), health)
            return health
        except (TimeoutError, NotReady) as error:
            answered_at, last = self._last_health
            if last is not None and time.monotonic() - answered_at < HEALTH_KEPT_S:
                return last
            return EngineHealth(
                state=EngineState.starting, default_model=self.settings.default_model, loaded_models=(),
                queue_depth=0, queue_capacity=self.settings.queue_size, device={"device": "ray"}, schedulers=(),
                error=f"no engine replica answered: {error or 'timed out'}",
            )

    # -- generation jobs --------------------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, options: JobOptions) -> JobSnapshot:
        routed = self._replicas.options(
            stream=True, multiplexed_model_id=request_model_id(request, self.settings.default_model)
        )
        stream: DeploymentResponseGenerator = routed.run.remote(request, options)
        try:
            first = await stream.__anext__()
        except BackPressureError as error:
            raise QueueFull(self.settings.queue_size, retry_after_s=5) from error
        except Exception as error:
            raise _domain_error(error) from error
        follower = _Follower(first, stream, self.store, self.settings.output_dir)
        self._keep(follower)
        follower.task = asyncio.create_task(follower.follow(), name=f"follow-job-{first.id}")
        return first

    async def wait(self, job_id: str) -> JobSnapshot:
        follower = self._followers.get(job_id)
        if follower is None:
            snapshot = await self._until_recorded_end(job_id)
        else:
            await follower.finished.wait()
            if follower.error is not None:
                raise follower.error
            snapshot = follower.snapshot
        if snapshot.status is JobStatus.succeeded:
            return snapshot
        raise JobCancelled(snapshot.error or snapshot.status.value)

    async def cancel(self, job_id: str, wait_s: float = 0.0) -> JobSnapshot:
        follower = self._followers.get(job_id)
        if follower is None:
            recorded = await self.job(job_id, with_result=False)
            if recorded.status.finished:
                raise JobFinished(f"job {job_id} is already {recorded.status.value}; nothing to cancel")
            raise NotReady(f"job {job_id} is followed by another ingress replica; cancel it there")
        if follower.finished.is_set():
            raise JobFinished(f"job {job_id} is already {follower.snapshot.status.value}; nothing to cancel")
        follower.request_cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(follower.finished.wait()), wait_s)
        return follower.current(with_result=True)

    async def stop_early(self, job_id: str) -> JobSnapshot:
        """A1111's interrupt. The one signal that reaches a job's replica is cancelling its call, so on Ray Serve
        this cancels the job (no partial image), waiting briefly for it to stop."""
        return await self.cancel(job_id, wait_s=2.0)

    async def saved_image_ids(self, job_id: str, timeout_s: float = 30.0) -> tuple[str, ...]:
        """Read from the shared database once the replica's recorder has written the files."""
        follower = self._followers.get(job_id)
        if follower is not None:
            await follower.finished.wait()
        deadline = time.monotonic() + timeout_s
        while True:
            snapshot = await self.job(job_id, with_result=False)
            saves = self.settings.save_images if snapshot.options.save is None else snapshot.options.save
            if snapshot.image_ids or not saves or snapshot.status is not JobStatus.succeeded \
                    or time.monotonic() > deadline:
                return snapshot.image_ids if snapshot.status is JobStatus.succeeded else ()
            await asyncio.sleep(RECORD_POLL_S)

    async def job(self, job_id: str, with_result: bool = True) -> JobSnapshot:
        follower = self._followers.get(job_id)
        if follower is not None:
            return follower.current(with_result)
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
            follower = self._followers.get(record.id)
            if follower is not None and not follower.finished.is_set():  # live progress, not in the database
                snapshots.append(follower.current(with_result=False))
            else:
                snapshots.append(snapshot_from_record(record, self.settings.output_dir, with_result=False))
        return Page(snapshots, total)

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        follower = self._followers.get(job_id)
        if follower is None:  # finished before this ingress started, or followed by another one
            yield _final_event(await self._until_recorded_end(job_id))
            return
        replay, incoming = follower.subscribe()
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
            follower.unsubscribe(incoming)

    async def current_job(self) -> JobSnapshot | None:
        for follower in self._followers.values():
            if follower.snapshot.status is JobStatus.running:
                return follower.current(with_result=False)
        return None

    def _keep(self, follower: _Follower) -> None:
        self._followers[follower.snapshot.id] = follower
        finished = [job_id for job_id, kept in self._followers.items() if kept.finished.is_set()]
        for job_id in finished[: max(0, len(finished) - FINISHED_JOBS_KEPT)]:
            del self._followers[job_id]

    async def _until_recorded_end(self, job_id: str) -> JobSnapshot:
        """A job this ingress does not follow, from the database once it has finished there."""
        while True:
            snapshot = await self.job(job_id)
            if snapshot.status.finished:
                return snapshot
            await asyncio.sleep(RECORD_POLL_S * 5)

    # -- saved images -------------------------------------------------------------------------------------------------
    async def images(self, limit: int, offset: int, model: str | None = None, prompt: str | None = None) -> Page:
        records, total = await asyncio.to_thread(self.store.list_images, limit, offset, model, prompt)
        return Page([image_snapshot(record) for record in records], total)

    async def image_file(self, image_id: str) -> tuple[ImageSnapshot, Path]:
        record = await asyncio.to_thread(self.store.get_image, image_id)
        if record is None:
            raise ImageNotFound(f"no image {image_id!r}")
        return image_snapshot(record), await asyncio.to_thread(image_path, self.settings.output_dir, record)

    # -- the registry (a shared file: replicas re-read it when it changes) ------------------------------------------
    async def registry(self) -> dict[str, RegistryEntry]:
        return await asyncio.to_thread(self._access.entries)

    async def register(self, name: str, entry: RegistryEntry, replace: bool = False) -> RegistryEntry:
        return await asyncio.to_thread(self._access.register, name, entry, replace)

    async def unregister(self, name: str) -> None:
        await asyncio.to_thread(self._access.unregister, name)

    async def reload_registry(self) -> dict[str, RegistryEntry]:
        return await asyncio.to_thread(self._access.reload)

    # -- what is loaded: on the replica Serve routes to (by model where one is named) -------------------------------
    async def pipeline_state(self) -> list[ModelState]:
        return await self._forward("pipeline_state")

    async def evict(self, name: str) -> bool:
        return await self._forward("evict", name, model=name)

    async def preload_lora(self, model: str, spec: LoraSpec, adapter_name: str | None, scale: float | None) -> LoraInfo:
        return await self._forward("preload_lora", model, spec, adapter_name, scale, model=model)

    async def unload_lora(self, name: str, model: str | None = None) -> dict[str, list[str]]:
        return await self._forward("unload_lora", name, model, model=model)

    async def loaded_loras(self) -> dict[str, list[LoraInfo]]:
        return await self._forward("loaded_loras")

    async def preloaded_lora_names(self, model: str) -> list[str]:
        return await self._forward("preloaded_lora_names", model, model=model)

    async def preload_controlnet(self, source: str, name: str | None, check_model: str) -> ControlNetInfo:
        return await self._forward("preload_controlnet", source, name, check_model, model=check_model)

    async def unload_controlnet(self, name: str) -> None:
        await self._forward("unload_controlnet", name)

    async def loaded_controlnets(self) -> list[ControlNetInfo]:
        return await self._forward("loaded_controlnets")

    async def latest_controlnet(self) -> str | None:
        return await self._forward("latest_controlnet")

    async def system_stats(self) -> dict[str, Any]:
        return await self._forward("system_stats")

    async def _forward(self, method: str, *arguments: Any, model: str | None = None) -> Any:
        handle = self._replicas.options(multiplexed_model_id=model_id(model)) if model else self._replicas
        return await self._remote(handle.call, method, *arguments)

    @staticmethod
    async def _remote(method: Any, *arguments: Any) -> Any:
        try:
            return await method.remote(*arguments)
        except Exception as error:
            raise _domain_error(error) from error


class _Follower:
    """One job's stream from its replica, read by a task of its own: its latest state, its events for every
    subscriber (replaying the state first, like the worker's jobs do), its end."""

    def __init__(self, first: JobSnapshot, stream: DeploymentResponseGenerator, store: Store, output_dir: Path):
        self.snapshot = first
        self.stream = stream
        self.store = store
        self.output_dir = output_dir
        self._seq = 0
        self.task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        self.error: BaseException | None = None
        self.cancel_requested = False
        self._latest: dict[str, JobEvent] = {}
        self._listeners: list[asyncio.Queue[JobEvent]] = []

    def current(self, with_result: bool) -> JobSnapshot:
        pending_cancel = self.cancel_requested and not self.snapshot.status.finished
        return replace(self.snapshot, cancel_requested=pending_cancel,
                       result=self.snapshot.result if with_result else None)

    def subscribe(self) -> tuple[list[JobEvent], asyncio.Queue[JobEvent]]:
        incoming: asyncio.Queue[JobEvent] = asyncio.Queue()
        if "terminal" in self._latest:
            return [self._latest["terminal"]], incoming
        self._listeners.append(incoming)
        if "started" in self._latest:
            return [self._latest[kind] for kind in ("started", "progress") if kind in self._latest], incoming
        return ([self._latest["queued"]] if "queued" in self._latest else []), incoming

    def unsubscribe(self, incoming: asyncio.Queue[JobEvent]) -> None:
        if incoming in self._listeners:
            self._listeners.remove(incoming)

    def request_cancel(self) -> None:
        self.cancel_requested = True
        self.stream.cancel()

    def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def follow(self) -> None:
        terminal: JobEvent | None = None
        try:
            async for item in self.stream:
                if isinstance(item, JobSnapshot):
                    self.snapshot = item
                elif item.terminal:
                    terminal = item  # told once the finished snapshot (with the images) or the job's error is here
                else:
                    self._emit(item)
        except asyncio.CancelledError:
            if not self.cancel_requested:  # this process is stopping: the replica cancels the job
                self.stream.cancel()
                raise
            await self._recorded_end()
            return
        except Exception as error:  # noqa: BLE001 - sorted below: the job's error, a cancel, or a lost replica
            if terminal is not None and isinstance(error, RayTaskError):
                self.error = _domain_error(error)  # the job failed or was cancelled: its terminal event said so
            elif self.cancel_requested and not isinstance(error, RayActorError):
                await self._recorded_end()
                return
            else:
                await self._lost(error)
                return
        if terminal is None:
            await (self._recorded_end() if self.cancel_requested else self._lost(RuntimeError("the stream ended")))
            return
        self._emit(terminal)
        self.finished.set()

    def _emit(self, event: JobEvent) -> None:
        if "terminal" in self._latest:
            return
        self._seq = max(self._seq, event.seq)
        self._latest["terminal" if event.terminal else event.kind] = event
        self.snapshot = _advanced(self.snapshot, event)
        for incoming in self._listeners:
            incoming.put_nowait(event)

    async def _recorded_end(self) -> None:
        """After a cancel: the end the replica records (cancelled; or succeeded, when it finished first)."""
        deadline = time.monotonic() + RECORD_WAIT_S
        while time.monotonic() < deadline:
            record = await asyncio.to_thread(self.store.get_job, self.snapshot.id)
            if record is not None and JobStatus(record.status).finished:
                recorded = await asyncio.to_thread(snapshot_from_record, record, self.output_dir)
                self.snapshot = replace(recorded, options=self.snapshot.options)
                if recorded.status is not JobStatus.succeeded:
                    self.error = JobCancelled(recorded.error or recorded.status.value)
                self._emit(replace(_final_event(recorded), seq=self._seq + 1))
                self.finished.set()
                return
            await asyncio.sleep(RECORD_POLL_S)
        await self._lost(TimeoutError("its replica did not record the cancelled job"))

    async def _lost(self, error: BaseException) -> None:
        job_id = self.snapshot.id
        logger.error("job %s: its engine replica was lost: %r", job_id, error)
        self.error = ReplicaLost(f"job {job_id}: {LOST_REASON}")
        await asyncio.to_thread(self.store.fail_unfinished, job_id, LOST_REASON)
        self._emit(JobEvent(job_id, "error", self._seq + 1, JobStatus.failed, time.time(), detail=LOST_REASON))
        self.finished.set()


def _advanced(snapshot: JobSnapshot, event: JobEvent) -> JobSnapshot:
    """The snapshot moved on by one event (the database has no per-step progress; this is the live view)."""
    changes: dict[str, Any] = {"status": event.status}
    if event.kind == "queued":
        changes["queue_position"] = event.position
    elif event.kind == "started":
        changes |= {"queue_position": 0, "started_at": event.at}
    elif event.kind == "progress":
        changes |= {"queue_position": 0, "step": event.step or 0, "total_steps": event.total_steps or 0}
    else:
        changes |= {"queue_position": None, "finished_at": event.at}
        if event.kind != "done":
            changes["error"] = event.detail
    return replace(snapshot, **changes)


def _final_event(snapshot: JobSnapshot) -> JobEvent:
    kind = {"succeeded": "done", "cancelled": "cancelled"}.get(snapshot.status.value, "error")
    detail = None if kind == "done" else snapshot.error or snapshot.status.value
    return JobEvent(snapshot.id, kind, 1, snapshot.status, snapshot.finished_at or snapshot.created_at,  # type: ignore[arg-type]
                    detail=detail)


def _domain_error(error: BaseException) -> BaseException:
    """The engine's own error inside a Ray error (the API maps it to its status), else NotReady for a call that
    found no replica, else the error as it is."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, SdserveError):
        return cause
    if isinstance(error, SdserveError):
        return error
    if isinstance(error, RayActorError):
        return ReplicaLost(f"the engine replica stopped while answering: {error.__class__.__name__}")
    return error
