"""LoRA adapters over HTTP: preload, list, unload; seed 003's /load-lora/; the pipeline state.

Generation requests name their LoRAs themselves (the `loras` field); these routes only warm, inspect and free the
adapter cache. Everything that touches a pipeline runs on the worker thread through `worker.call`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError

from api.compat import build_body
from api.deps import RegistryDep, SettingsDep, WorkerDep
from api.lora_schemas import (
    LoadedLora,
    LoadLoraBody,
    LoadLoraCompatBody,
    LoadLoraCompatResponse,
    LoraList,
    PipelineState,
    RegisteredLora,
    UnloadedLoras,
)
from models.lora_calls import loaded_loras, pipeline_state, preload_lora, unload_lora
from models.pipelines import PipelineCache
from models.worker import GenerationWorker

router = APIRouter(tags=["loras"])
T = TypeVar("T")


async def on_worker(worker: GenerationWorker, function: Callable[[PipelineCache], T]) -> T:
    return await asyncio.wrap_future(worker.call(function))


@router.get("/loras", response_model=LoraList, summary="Loaded LoRAs per base model, and the registry's LoRAs")
@router.get("/loras/", response_model=LoraList, include_in_schema=False)
async def list_loras(worker: WorkerDep, registry: RegistryDep, settings: SettingsDep) -> LoraList:
    loaded = await on_worker(worker, loaded_loras)
    registered = [RegisteredLora.from_entry(name, entry) for name, entry in sorted(registry.entries().items())
                  if entry.kind == "lora"]
    return LoraList(
        loaded={model: [LoadedLora.from_domain(model, info) for info in infos] for model, infos in loaded.items()},
        registered=registered,
        max_per_model=settings.max_loras,
    )


@router.post("/loras", response_model=LoadedLora, summary="Load a LoRA into a base model ahead of requests")
@router.post("/loras/", response_model=LoadedLora, include_in_schema=False)
async def load_lora(body: LoadLoraBody, worker: WorkerDep, settings: SettingsDep) -> LoadedLora:
    model = body.model or settings.default_model
    call = partial(preload_lora, model_name=model, spec=body.to_spec(), adapter_name=body.adapter_name,
                   scale=body.scale)
    return LoadedLora.from_domain(model, await on_worker(worker, call))


@router.post("/load-lora/", response_model=LoadLoraCompatResponse, summary="Seed 003: load a LoRA with a scale")
@router.post("/load-lora", response_model=LoadLoraCompatResponse, include_in_schema=False)
async def load_lora_seed_003(request: Request, worker: WorkerDep, settings: SettingsDep) -> LoadLoraCompatResponse:
    body = build_body(LoadLoraCompatBody, **await request_fields(request))
    loaded = await load_lora(body.to_native(), worker, settings)
    message = f"LoRA loaded into {loaded.model!r} as adapter {loaded.adapter_name!r} with scale {loaded.scale}"
    return LoadLoraCompatResponse(message=message, **loaded.model_dump())


@router.delete("/loras/{name}", response_model=UnloadedLoras, summary="Unload a LoRA adapter")
async def delete_lora(name: str, worker: WorkerDep, model: str | None = None) -> UnloadedLoras:
    """`name` is an adapter name (see GET /loras) or the reference it was loaded with; `model` limits it to one
    base. The registry entry, if any, stays: DELETE /models/{name} removes that."""
    return UnloadedLoras(unloaded=await on_worker(worker, partial(unload_lora, name=name, model_name=model)))


@router.get("/pipeline-state", response_model=PipelineState, summary="Loaded bases, pipelines, schedulers, LoRAs")
@router.get("/pipeline-state/", response_model=PipelineState, include_in_schema=False)
async def get_pipeline_state(request: Request, worker: WorkerDep, settings: SettingsDep) -> PipelineState:
    states = await on_worker(worker, pipeline_state)
    return PipelineState.build(states, request.app.state.device.describe(), settings.default_model)


async def request_fields(request: Request) -> dict[str, Any]:
    """Seed 003 clients send these fields as query parameters, a form or JSON: take whichever came."""
    fields: dict[str, Any] = dict(request.query_params)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            body = await request.json()
        except ValueError as error:
            raise RequestValidationError([{"loc": ("body",), "msg": "invalid JSON", "type": "json_invalid"}]) \
                from error
        if isinstance(body, dict):
            fields.update(body)
    elif content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        fields.update({key: value for key, value in (await request.form()).items() if isinstance(value, str)})
    return fields
