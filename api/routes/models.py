"""The registry over HTTP: list, show, register, delete, reload."""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import EngineDep, SettingsDep
from api.schemas import ModelInfo, ModelList, RegisterModelBody
from models.errors import ModelNotFound
from models.registry import RegistryEntry

router = APIRouter(prefix="/models", tags=["models"])


async def _model_list(entries: dict[str, RegistryEntry], engine: EngineDep, settings: SettingsDep) -> ModelList:
    loaded = (await engine.health()).loaded_models
    models = [ModelInfo.from_entry(name, entry, loaded) for name, entry in sorted(entries.items())]
    return ModelList(default=settings.default_model, models=models)


@router.get("", response_model=ModelList, summary="Registered models")
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    return await _model_list(await engine.registry(), engine, settings)


@router.post("/reload", response_model=ModelList, summary="Re-read the registry file now")
async def reload_models(engine: EngineDep, settings: SettingsDep) -> ModelList:
    return await _model_list(await engine.reload_registry(), engine, settings)


@router.get("/{name}", response_model=ModelInfo, summary="One registered model")
async def show_model(name: str, engine: EngineDep) -> ModelInfo:
    entries = await engine.registry()
    if name not in entries:
        raise ModelNotFound(name, sorted(entries))
    return ModelInfo.from_entry(name, entries[name], (await engine.health()).loaded_models)


@router.post("", response_model=ModelInfo, status_code=status.HTTP_201_CREATED, summary="Register a model")
async def register_model(body: RegisterModelBody, engine: EngineDep) -> ModelInfo:
    entry = await engine.register(body.name, body.to_entry(), body.replace)
    return ModelInfo.from_entry(body.name, entry, (await engine.health()).loaded_models)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT, summary="Remove a model from the registry")
async def delete_model(name: str, engine: EngineDep) -> None:
    await engine.unregister(name)
