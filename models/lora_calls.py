"""What the /loras and /pipeline-state routes run on the worker thread (through `worker.call`), between jobs.

The worker owns the pipelines, so loading, unloading and even reading adapter state happens there; these
functions return plain snapshots that are safe to hand back to the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.adapters import LoraInfo, LoraSpec
from models.errors import AdapterNotFound
from models.pipelines import PipelineCache


@dataclass(frozen=True)
class PipelineInfo:
    task: str
    pipeline_class: str
    scheduler: str


@dataclass(frozen=True)
class ModelState:
    name: str
    pipelines: list[PipelineInfo]
    weight_bytes: int
    loaded_at: float
    loras: list[LoraInfo] = field(default_factory=list)
    applied_loras: list[tuple[str, float]] = field(default_factory=list)


def preload_lora(
    cache: PipelineCache, model_name: str, spec: LoraSpec, adapter_name: str | None, scale: float | None
) -> LoraInfo:
    _, model = cache.get(model_name, "text2img")
    assert model.loras is not None  # every loaded base gets its adapter set
    return model.loras.preload(spec, adapter_name, scale)


def unload_lora(cache: PipelineCache, name: str, model_name: str | None = None) -> dict[str, list[str]]:
    """Unload a LoRA (by adapter name or the reference it was loaded with) from one base or from all of them."""
    unloaded: dict[str, list[str]] = {}
    for model in cache.loaded():
        if model.loras is None or model_name not in (None, model.name):
            continue
        names = model.loras.unload(name)
        if names:
            unloaded[model.name] = names
    if not unloaded:
        loaded = sorted({lora.adapter_name for lora_list in loaded_loras(cache).values() for lora in lora_list})
        where = f" on model {model_name!r}" if model_name else ""
        raise AdapterNotFound(f"no LoRA {name!r} is loaded{where}; loaded: {', '.join(loaded) or 'none'}")
    return unloaded


def loaded_loras(cache: PipelineCache) -> dict[str, list[LoraInfo]]:
    return {model.name: model.loras.loaded() for model in cache.loaded() if model.loras is not None}


def pipeline_state(cache: PipelineCache) -> list[ModelState]:
    """Every loaded base, most recently used first, with its task pipelines, schedulers and adapters."""
    states = []
    for model in reversed(cache.loaded()):
        pipelines = [
            PipelineInfo(task, type(pipeline).__name__, type(pipeline.scheduler).__name__)
            for task, pipeline in model.pipelines.items()
        ]
        loras = model.loras.loaded() if model.loras is not None else []
        applied = model.loras.applied() if model.loras is not None else []
        states.append(ModelState(model.name, pipelines, model.weight_bytes, model.loaded_at, loras, applied))
    return states


def preloaded_lora_names(cache: PipelineCache, model_name: str) -> list[str]:
    """Adapter names loaded through POST /loras on a base. Seed 003's clients expect LoRAs loaded with
    /load-lora/ to apply to the generations that follow; its compat route can send these as the request's LoRAs."""
    model = next((model for model in cache.loaded() if model.name == model_name), None)
    if model is None or model.loras is None:
        return []
    return [info.adapter_name for info in model.loras.loaded() if info.preloaded]
