"""A fake engine behind the real EngineClient interface, for tests of routing and translation.

Jobs make flat grey images at once, or, with `gate`, only once the test opens it (a deterministic "slow job"); a
cancel then takes effect when the gate opens, like the real engine's between-steps cancel. Every request the
engine receives is kept in `submitted`, so a test can check what a route translated a body into.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from models.errors import (
    ImageNotFound,
    InvalidRequest,
    JobCancelled,
    JobFinished,
    JobNotFound,
    ModelNotFound,
    QueueFull,
)
from models.registry import RegistryEntry
from models.types import (
    ControlNetInfo,
    ControlNetUse,
    EngineHealth,
    EngineState,
    GenerationRequest,
    GenerationResult,
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


@dataclass
class _FakeJob:
    snapshot: JobSnapshot
    request: GenerationRequest
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    stopped_early: bool = False


class FakeEngine:
    def __init__(self, gate: threading.Event | None = None, queue_size: int = 16):
        self.gate = gate
        self.queue_size = queue_size
        self.submitted: list[GenerationRequest] = []
        self.entries = {"demo": RegistryEntry(source="demo:tiny")}
        self._jobs: dict[str, _FakeJob] = {}

    async def start(self) -> None: ...

    async def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()

    async def health(self) -> EngineHealth:
        return EngineHealth(EngineState.ready, "demo", ("demo",), self._waiting(), self.queue_size,
                            {"device": "fake", "dtype": "float32", "attention": "none"}, ("ddim", "euler"))

    # -- jobs ---------------------------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, options: JobOptions) -> JobSnapshot:
        model = request.model or "demo"
        if model not in self.entries:
            raise ModelNotFound(model, sorted(self.entries))
        if self._waiting() >= self.queue_size:
            raise QueueFull(self._waiting(), 1)
        if max(request.width or 0, request.height or 0) > 2048 or request.num_images > 8 or request.steps > 150:
            raise InvalidRequest("over the default limits (the real engine names which)")
        self.submitted.append(request)
        snapshot = JobSnapshot(
            id=uuid.uuid4().hex, task=request.task, status=JobStatus.running, prompt=request.prompt,
            negative_prompt=request.negative_prompt, model=model, options=options,
            seed_origin="client" if request.seed is not None else "drawn", created_at=time.time(),
            started_at=time.time(), queue_position=0, total_steps=request.steps,
        )
        job = _FakeJob(snapshot, replace(request, seed=request.seed if request.seed is not None else 1))
        self._jobs[snapshot.id] = job
        asyncio.get_running_loop().create_task(self._run(job))
        return snapshot

    async def _run(self, job: _FakeJob) -> None:
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 60)
        if job.cancel_requested:
            job.snapshot = replace(job.snapshot, status=JobStatus.cancelled, error="cancelled", finished_at=time.time())
        else:
            job.snapshot = replace(job.snapshot, status=JobStatus.succeeded, step=job.request.steps,
                                   finished_at=time.time(), queue_position=None, result=_result(job))
        job.finished.set()

    async def wait(self, job_id: str) -> JobSnapshot:
        job = self._get(job_id)
        await job.finished.wait()
        if job.snapshot.status is JobStatus.cancelled:
            raise JobCancelled("cancelled")
        return job.snapshot

    async def cancel(self, job_id: str, wait_s: float = 0.0) -> JobSnapshot:
        job = self._get(job_id)
        if job.snapshot.status.finished:
            raise JobFinished(f"job {job_id} is already {job.snapshot.status.value}; nothing to cancel")
        job.cancel_requested = True
        job.snapshot = replace(job.snapshot, cancel_requested=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(job.finished.wait(), wait_s)
        return job.snapshot

    async def stop_early(self, job_id: str) -> JobSnapshot:
        """Like the real engine: the job still succeeds, its result says where it stopped (step 1 here)."""
        job = self._get(job_id)
        if job.snapshot.status.finished:
            raise JobFinished(f"job {job_id} is already {job.snapshot.status.value}; nothing to stop")
        job.stopped_early = True
        if self.gate is not None:
            self.gate.set()
        return job.snapshot

    async def saved_image_ids(self, job_id: str, timeout_s: float = 30.0) -> tuple[str, ...]:
        """Made-up ids for a job that asked to save its images (the fake writes no files)."""
        job = self._get(job_id)
        if not job.snapshot.options.save or job.snapshot.result is None:
            return ()
        return tuple(f"{job_id[:24]}{index:08x}" for index in range(len(job.snapshot.result.images)))

    async def job(self, job_id: str, with_result: bool = True) -> JobSnapshot:
        snapshot = self._get(job_id).snapshot
        return snapshot if with_result else replace(snapshot, result=None)

    async def jobs(self, limit: int, offset: int, status: JobStatus | None = None) -> Page:
        snapshots = [job.snapshot for job in reversed(self._jobs.values())
                     if status is None or job.snapshot.status is status]
        return Page([replace(s, result=None) for s in snapshots[offset:offset + limit]], len(snapshots))

    async def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        job = self._get(job_id)
        await job.finished.wait()
        snapshot = job.snapshot
        kind = "done" if snapshot.status is JobStatus.succeeded else "cancelled"
        yield JobEvent(job_id, kind, 1, snapshot.status, time.time(), detail=snapshot.error)

    async def current_job(self) -> JobSnapshot | None:
        running = [job.snapshot for job in self._jobs.values() if not job.snapshot.status.finished]
        return running[0] if running else None

    def _get(self, job_id: str) -> _FakeJob:
        if job_id not in self._jobs:
            raise JobNotFound(job_id)
        return self._jobs[job_id]

    def _waiting(self) -> int:
        return sum(not job.snapshot.status.finished for job in self._jobs.values())

    # -- everything else: empty, as on a fresh server --------------------------------------------------------------
    async def images(self, limit: int, offset: int, model: str | None = None, prompt: str | None = None) -> Page:
        return Page([], 0)

    async def image_file(self, image_id: str) -> tuple[ImageSnapshot, Path]:
        raise ImageNotFound(f"no image {image_id!r}")

    async def registry(self) -> dict[str, RegistryEntry]:
        return dict(self.entries)

    async def register(self, name: str, entry: RegistryEntry, replace: bool = False) -> RegistryEntry:
        self.entries[name] = entry
        return entry

    async def unregister(self, name: str) -> None:
        if name not in self.entries:
            raise ModelNotFound(name, sorted(self.entries))
        self.entries.pop(name)

    async def reload_registry(self) -> dict[str, RegistryEntry]:
        return dict(self.entries)

    async def pipeline_state(self) -> list[ModelState]:
        return []

    async def evict(self, name: str) -> bool:
        return False

    async def preload_lora(self, model: str, spec: LoraSpec, adapter_name: str | None, scale: float | None) -> LoraInfo:
        return LoraInfo(adapter_name or spec.name, spec.name, spec.name, scale or 1.0, (), True, time.time(), 0)

    async def unload_lora(self, name: str, model: str | None = None) -> dict[str, list[str]]:
        return {}

    async def loaded_loras(self) -> dict[str, list[LoraInfo]]:
        return {}

    async def preloaded_lora_names(self, model: str) -> list[str]:
        return []

    async def preload_controlnet(self, source: str, name: str | None, check_model: str) -> ControlNetInfo:
        return ControlNetInfo(name or source, source, True, time.time(), 0)

    async def unload_controlnet(self, name: str) -> None: ...

    async def loaded_controlnets(self) -> list[ControlNetInfo]:
        return []

    async def latest_controlnet(self) -> str | None:
        return None

    async def system_stats(self) -> dict:
        return {"cpu_ram": {"total": 1, "available": 1, "percent": 0.0, "used": 0, "free": 1}, "gpu": []}


def _result(job: _FakeJob) -> GenerationResult:
    request = job.request
    width, height = request.width or 64, request.height or 64
    if request.hires is not None:
        width, height = request.hires.width, request.hires.height
    assert request.seed is not None
    seeds = [request.seed + index for index in range(request.num_images)]
    return GenerationResult(
        images=[Image.new("RGB", (width, height), (seed % 256,) * 3) for seed in seeds], seeds=seeds,
        model=job.snapshot.model, prompt=request.prompt, negative_prompt=request.negative_prompt, width=width,
        height=height, steps=request.steps, guidance_scale=request.guidance_scale or 7.0, strength=request.strength,
        scheduler=request.scheduler or "FakeScheduler", scheduler_name=request.scheduler, hires=request.hires,
        first_pass_size=(request.width or 64, request.height or 64) if request.hires else None,
        stopped_at_step=1 if job.stopped_early else None,
        controlnets=tuple(ControlNetUse(c.name, c.scale, c.guidance_start, c.guidance_end, c.guess_mode)
                          for c in request.controlnets),
    )
