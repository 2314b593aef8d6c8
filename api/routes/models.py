"""The registry over HTTP: list, show, register, delete, reload."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, status
from starlette.concurrency import run_in_threadpool

from api.deps import RegistryDep, SettingsDep, WorkerDep
from api.schemas import ModelInfo, ModelList, RegisterModelBody
from models.registry import RegistryEntry

router = APIRouter(prefix="/models", tags=["models"])


def _info(name: str, entry: RegistryEntry, loaded: set[str]) -> ModelInfo:
    return ModelInfo(name=name, loaded=name in loaded, **entry.model_dump(exclude={"weight_name", "config"}))


@router.get("", response_model=ModelList, summary="Registered models")
async def list_models(registry: RegistryDep, worker: WorkerDep, settings: SettingsDep) -> ModelList:
    loaded = set(worker.cache.loaded_names())
    models = [_info(name, entry, loaded) for name, entry in sorted(registry.entries().items())]
    return ModelList(default=settings.default_model, models=models)


@router.post("/reload", response_model=ModelList, summary="Re-read the registry file now")
async def reload_models(registry: RegistryDep, worker: WorkerDep, settings: SettingsDep) -> ModelList:
    await run_in_threadpool(registry.reload)
    return await list_models(registry, worker, settings)


@router.get("/{name}", response_model=ModelInfo, summary="One registered model")
async def show_model(name: str, registry: RegistryDep, worker: WorkerDep) -> ModelInfo:
    return _info(name, registry.get(name), set(worker.cache.loaded_names()))


@router.post("", response_model=ModelInfo, status_code=status.HTTP_201_CREATED, summary="Register a model")
async def register_model(body: RegisterModelBody, registry: RegistryDep, worker: WorkerDep) -> ModelInfo:
    entry = RegistryEntry(**body.model_dump(exclude={"name", "replace"}))
    await run_in_threadpool(registry.register, body.name, entry, body.replace)
    if body.replace:
        # A replaced base must be loaded again from its new source.
        await _unload(worker, body.name)
    return _info(body.name, entry, set(worker.cache.loaded_names()))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a model from the registry")
async def delete_model(name: str, registry: RegistryDep, worker: WorkerDep) -> None:
    await run_in_threadpool(registry.delete, name)
    await _unload(worker, name)


async def _unload(worker: WorkerDep, name: str) -> None:
    await asyncio.wrap_future(worker.call(lambda cache: cache.evict(name)))
