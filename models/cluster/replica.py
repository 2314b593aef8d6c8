"""One engine replica on Ray Serve: a `LocalEngine` (worker thread, pipeline cache, recorder) on the device Ray gave
this replica, and the calls the ingress's `RayEngine` makes to it.

Each job is one streaming call (`run`): the job's snapshot once it is queued, then its events, then its finished
snapshot (or its error raised). Cancelling that call (the ingress does, when a client cancels the job) cancels the
job here. Everything that crosses is a plain type of models/types.py, pickled by Ray.

Model-aware routing: every call carries its multiplexed model id (models/cluster/routing.py); `get_model` loads
that base the first time, and Serve then sends the model's requests to the replicas that report having it. Each
replica keeps its own LRU limits (SDSERVE_MAX_LOADED_MODELS, SDSERVE_MAX_LORAS): Serve's list is a routing hint
of the same size, and what is really loaded is decided here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from ray import serve

from models.cluster.routing import base_model, model_id, request_model_id
from models.engine.pipelines import PipelineCache
from models.local import LocalEngine
from models.settings import get_settings
from models.types import EngineHealth, GenerationRequest, JobEvent, JobOptions, JobSnapshot

logger = logging.getLogger(__name__)
T = TypeVar("T")

# What the ingress may call through `call` (the rest of the engine interface runs in the ingress itself).
FORWARDED = frozenset({
    "pipeline_state", "evict", "preload_lora", "unload_lora", "loaded_loras", "preloaded_lora_names",
    "preload_controlnet", "unload_controlnet", "loaded_controlnets", "latest_controlnet", "system_stats",
})


class EngineReplica:
    async def __init__(self) -> None:
        settings = get_settings()
        context = serve.get_replica_context()
        # Stable across restarts: Ray gives a replacement replica the rank of the one it replaces, so this
        # replica's start-up marks the jobs its predecessor left unfinished, and nobody else's.
        self.name = f"{context.app_name}/{context.deployment}#{context.rank.rank}"
        self.engine = LocalEngine(settings, name=self.name)
        await self.engine.start()
        limit = settings.max_loaded_models * settings.max_loras

        async def load_model(multiplexed_id: str) -> str:  # a function: Serve keeps its cache on it
            return await self._load_model(multiplexed_id)

        self.get_model = serve.multiplexed(max_num_models_per_replica=limit)(load_model)
        await self._announce_default_model(settings.default_model)
        logger.info("engine replica %s (pid %d) started on %s", self.name, os.getpid(), self.engine.device.describe())

    async def __del__(self) -> None:
        await self.engine.stop()

    # -- jobs -------------------------------------------------------------------------------------------------------
    async def run(self, request: GenerationRequest, options: JobOptions) -> AsyncIterator[JobSnapshot | JobEvent]:
        """Queue one job here and stream it: its snapshot, its events, its finished snapshot (or its error)."""
        multiplexed_id = serve.get_multiplexed_model_id() or request_model_id(
            request, self.engine.settings.default_model
        )
        await self.get_model(multiplexed_id)
        snapshot = await self.engine.submit(request, options)
        yield snapshot
        followed = False
        try:
            async for event in self.engine.events(snapshot.id):
                yield event
            followed = True
        finally:
            if not followed:  # the ingress cancelled the call (or went away): the job stops at its next step
                logger.info("job %s: its call was cancelled; cancelling the job", snapshot.id)
                self.engine.worker.cancel(snapshot.id)
        yield await self.engine.wait(snapshot.id)

    async def _load_model(self, multiplexed_id: str) -> str:
        """Serve's multiplexed loader: the base model of `multiplexed_id` loaded here (its LoRAs load with the
        first job that names them)."""
        name = base_model(multiplexed_id)
        await self._on_worker(self._forget_changed_models)
        await self._on_worker(lambda cache: cache.get(name, "text2img"))
        return multiplexed_id

    async def _announce_default_model(self, name: str) -> None:
        """Every replica loads the default model at start-up: tell Serve, so requests for it are spread over all
        replicas. Serve sends a model's requests only to the replicas it knows to have it (others are a fallback
        once those are full), so unannounced, every default-model request would go to the first replica asked."""
        try:
            await self.get_model(model_id(name))
        except Exception:  # noqa: BLE001 - the replica still serves other models; health says why this one failed
            logger.exception("engine replica %s could not load the default model %r", self.name, name)

    def _forget_changed_models(self, cache: PipelineCache) -> None:
        """Unload bases whose registry entry was replaced or removed since they were loaded: the registry file is
        shared, so a change made through any replica, the ingress or a training run is seen here too."""
        entries = cache.registry.entries()
        for loaded in cache.loaded():
            if entries.get(loaded.name) != loaded.entry:
                logger.info("model %r changed in the registry; unloading this replica's copy", loaded.name)
                cache.evict(loaded.name)

    async def _on_worker(self, function: Callable[[PipelineCache], T]) -> T:
        return await asyncio.wrap_future(self.engine.worker.call(function))

    # -- the rest of the engine -------------------------------------------------------------------------------------
    async def health(self) -> EngineHealth:
        return await self.engine.health()

    async def call(self, method: str, *arguments: Any) -> Any:
        """One engine method that acts on what this replica has loaded (LoRAs, ControlNets, pipelines)."""
        if method not in FORWARDED:
            raise ValueError(f"{method!r} is not forwarded to engine replicas")
        if method == "preload_lora":  # it loads its base: let Serve route that model's requests here
            await self.get_model(serve.get_multiplexed_model_id() or arguments[0])
        return await getattr(self.engine, method)(*arguments)

    async def identity(self) -> dict[str, Any]:
        """Which replica answered: its name, process and host (tests and benchmarks use it)."""
        return {"name": self.name, "pid": os.getpid(), "host": socket.gethostname()}
