"""The engine interface: the one seam between the HTTP layer (api/) and everything that generates.

`api/` calls an `EngineClient` and nothing else of the engine. Every method takes and returns the plain types of
models/types.py (and registry entries), never a live pipeline, job or database row, so the engine behind it can
be this process (`LocalEngine`, models/local.py) or replicas in other processes and machines;
`models.engines.open_engine` picks the one the settings ask for.

Every method is a coroutine: call it from the event loop; an implementation does its blocking work elsewhere.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from models.registry import RegistryEntry
from models.types import (
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


class EngineClient(Protocol):
    # -- lifecycle --------------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start taking jobs; the default model loads in the background (health says when it is ready)."""

    async def stop(self) -> None:
        """Interrupt what is queued or running, write what is left to the database, release the device."""

    async def health(self) -> EngineHealth: ...

    # -- generation jobs ----------------------------------------------------------------------------------------------
    async def submit(self, request: GenerationRequest, options: JobOptions) -> JobSnapshot:
        """Queue a generation (or answer it from the result cache). Raises InvalidRequest, ModelNotFound,
        QueueFull or NotReady before anything is queued."""

    async def wait(self, job_id: str) -> JobSnapshot:
        """Until the job has finished; its result when it succeeded. Raises the job's error when it failed,
        JobCancelled when it was cancelled. Cancelling the wait does not cancel the job."""

    async def cancel(self, job_id: str, wait_s: float = 0.0) -> JobSnapshot:
        """Cancel a queued job at once, or a running one at its next step (waiting up to `wait_s` for it to stop);
        raises JobFinished, JobNotFound."""

    async def stop_early(self, job_id: str) -> JobSnapshot:
        """Finish a running job at its next step with the images as they are (A1111's interrupt): it succeeds,
        its result's `stopped_at_step` says where it stopped. A queued job is cancelled. Raises JobFinished,
        JobNotFound."""

    async def saved_image_ids(self, job_id: str, timeout_s: float = 30.0) -> tuple[str, ...]:
        """The ids of a succeeded job's saved image files (GET /images/{id}), once they are written (waits up to
        `timeout_s`); empty when its images are not saved."""

    async def job(self, job_id: str, with_result: bool = True) -> JobSnapshot:
        """A live or recorded job; raises JobNotFound."""

    async def jobs(self, limit: int, offset: int, status: JobStatus | None = None) -> Page:
        """Jobs newest first, without results (Page of JobSnapshot)."""

    def events(self, job_id: str) -> AsyncIterator[JobEvent]:
        """The job's events: those that describe its state now, then each new one, to the terminal event."""

    async def current_job(self) -> JobSnapshot | None:
        """The job running on the device now, if any."""

    # -- saved images -------------------------------------------------------------------------------------------------
    async def images(self, limit: int, offset: int, model: str | None = None, prompt: str | None = None) -> Page:
        """Saved images newest first (Page of ImageSnapshot)."""

    async def image_file(self, image_id: str) -> tuple[ImageSnapshot, Path]:
        """A saved image and its PNG file; raises ImageNotFound."""

    # -- the registry -------------------------------------------------------------------------------------------------
    async def registry(self) -> dict[str, RegistryEntry]: ...

    async def register(self, name: str, entry: RegistryEntry, replace: bool = False) -> RegistryEntry:
        """Add (or replace) an entry; a replaced base is loaded again from its new source on next use."""

    async def unregister(self, name: str) -> None:
        """Remove an entry and unload what was loaded from it."""

    async def reload_registry(self) -> dict[str, RegistryEntry]: ...

    # -- what is loaded ---------------------------------------------------------------------------------------------
    async def pipeline_state(self) -> list[ModelState]:
        """Every loaded base, most recently used first."""

    async def evict(self, name: str) -> bool:
        """Unload a base model; False when it was not loaded."""

    async def preload_lora(self, model: str, spec: LoraSpec, adapter_name: str | None, scale: float | None) -> LoraInfo:
        ...

    async def unload_lora(self, name: str, model: str | None = None) -> dict[str, list[str]]:
        """Unloaded adapter names by base model; raises AdapterNotFound when nothing matched."""

    async def loaded_loras(self) -> dict[str, list[LoraInfo]]: ...

    async def preloaded_lora_names(self, model: str) -> list[str]:
        """Adapters loaded ahead into `model`: seed 003 applies them to every generation that follows."""

    async def preload_controlnet(self, source: str, name: str | None, check_model: str) -> ControlNetInfo:
        """Load a ControlNet ahead, refused if it does not fit `check_model`."""

    async def unload_controlnet(self, name: str) -> None:
        """Raises ControlNetNotFound naming the loaded ones when `name` is not loaded."""

    async def loaded_controlnets(self) -> list[ControlNetInfo]: ...

    async def latest_controlnet(self) -> str | None:
        """The ControlNet loaded ahead most recently (seed 003 generates with that one)."""

    async def system_stats(self) -> dict:
        """RAM and GPUs of the machine the engine runs on (seed 003's /stats shape)."""

