"""LoRA adapters over HTTP: preload, list, unload; the pipeline state.

Generation requests name their LoRAs themselves (the `loras` field); these routes only warm, inspect and free the
adapter cache. (Seed 003's /load-lora/ is in compat_seeds.py.)
"""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import EngineDep, SettingsDep
from api.lora_schemas import LoadedLora, LoadLoraBody, LoraList, PipelineState, RegisteredLora, UnloadedLoras

router = APIRouter(tags=["loras"])


@router.get("/loras", response_model=LoraList, summary="Loaded LoRAs per base model, and the registry's LoRAs")
@router.get("/loras/", response_model=LoraList, include_in_schema=False)
async def list_loras(engine: EngineDep, settings: SettingsDep) -> LoraList:
    loaded = await engine.loaded_loras()
    registered = [RegisteredLora.from_entry(name, entry) for name, entry in sorted((await engine.registry()).items())
                  if entry.kind == "lora"]
    return LoraList(
        loaded={model: [LoadedLora.from_domain(model, info) for info in infos] for model, infos in loaded.items()},
        registered=registered,
        max_per_model=settings.max_loras,
    )


@router.post("/loras", response_model=LoadedLora, summary="Load a LoRA into a base model ahead of requests")
@router.post("/loras/", response_model=LoadedLora, include_in_schema=False)
async def load_lora(body: LoadLoraBody, engine: EngineDep, settings: SettingsDep) -> LoadedLora:
    model = body.model or settings.default_model
    info = await engine.preload_lora(model, body.to_spec(), body.adapter_name, body.scale)
    return LoadedLora.from_domain(model, info)


@router.delete("/loras/{name}", response_model=UnloadedLoras, summary="Unload a LoRA adapter")
async def delete_lora(name: str, engine: EngineDep, model: str | None = None) -> UnloadedLoras:
    """`name` is an adapter name (see GET /loras) or the reference it was loaded with; `model` limits it to one
    base. The registry entry, if any, stays: DELETE /models/{name} removes that."""
    return UnloadedLoras(unloaded=await engine.unload_lora(name, model))


@router.get("/pipeline-state", response_model=PipelineState, summary="Loaded bases, pipelines, schedulers, LoRAs")
@router.get("/pipeline-state/", response_model=PipelineState, include_in_schema=False)
async def get_pipeline_state(engine: EngineDep, settings: SettingsDep) -> PipelineState:
    states = await engine.pipeline_state()
    return PipelineState.build(states, (await engine.health()).device, settings.default_model)
