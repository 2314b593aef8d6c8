"""The AUTOMATIC1111 web UI API subset most clients use, on top of the native requests."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.compat import A1111_SAMPLERS, build_body, resolve_model_alias, sampler_to_scheduler
from api.deps import RegistryDep, SettingsDep, WorkerDep
from api.images import Base64Image, encode_images
from api.routes.generation import execute
from api.schemas import GenerationBody, Img2ImgBody, InpaintingBody, Text2ImgBody
from models.engine import GenerationResult
from models.registry import BASE_KINDS
from models.worker import JobState

router = APIRouter(prefix="/sdapi/v1", tags=["compatibility: AUTOMATIC1111"])


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    prompt: str = ""
    negative_prompt: str | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[Base64Image] = Field(min_length=1)
    mask: Base64Image | None = None
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0


class GenerationAnswer(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


def _native_fields(body: Txt2ImgRequest, registry: RegistryDep) -> dict[str, Any]:
    return {
        "prompt": body.prompt or " ",
        "negative_prompt": body.negative_prompt or None,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "seed": body.seed,
        "number_of_images": body.batch_size * body.n_iter,
        "scheduler": sampler_to_scheduler(body.sampler_name or body.sampler_index, body.scheduler),
        "model": resolve_model_alias(registry, body.override_settings.get("sd_model_checkpoint")),
    }


async def _answer(body: Txt2ImgRequest, native: GenerationBody, result: GenerationResult) -> GenerationAnswer:
    images = await run_in_threadpool(encode_images, result.images, "png")
    info = {
        "prompt": native.prompt, "negative_prompt": native.negative_prompt or "", "seed": result.seeds[0],
        "all_seeds": result.seeds, "all_prompts": [native.prompt] * len(result.seeds), "width": result.width,
        "height": result.height, "steps": result.steps, "cfg_scale": result.guidance_scale,
        "sampler_name": body.sampler_name or result.scheduler, "sd_model_name": result.model,
        "denoising_strength": result.strength, "batch_size": body.batch_size,
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return GenerationAnswer(images=images, parameters=parameters, info=json.dumps(info))


@router.post("/txt2img", response_model=GenerationAnswer)
async def txt2img(body: Txt2ImgRequest, request: Request, worker: WorkerDep, registry: RegistryDep) -> Any:
    native = build_body(Text2ImgBody, **_native_fields(body, registry))
    _, result = await execute(native, request, worker)
    return await _answer(body, native, result)


@router.post("/img2img", response_model=GenerationAnswer)
async def img2img(body: Img2ImgRequest, request: Request, worker: WorkerDep, registry: RegistryDep) -> Any:
    fields = _native_fields(body, registry) | {"image": body.init_images[0], "strength": body.denoising_strength}
    if body.mask is not None:
        mask = body.mask.convert("L")
        if body.inpainting_mask_invert:
            mask = mask.point(lambda value: 255 - value)
        native: GenerationBody = build_body(InpaintingBody, mask_image=mask, **fields)
    else:
        native = build_body(Img2ImgBody, **fields)
    _, result = await execute(native, request, worker)
    return await _answer(body, native, result)


@router.get("/sd-models")
async def sd_models(registry: RegistryDep) -> list[dict[str, Any]]:
    return [
        {"title": name, "model_name": name, "hash": (entry.sha256 or "")[:10] or None, "sha256": entry.sha256,
         "filename": entry.source, "config": None}
        for name, entry in sorted(registry.entries().items()) if entry.kind in BASE_KINDS
    ]


@router.get("/loras")
async def loras(registry: RegistryDep) -> list[dict[str, Any]]:
    return [
        {"name": name, "alias": name, "path": entry.source,
         "metadata": {"base": entry.base, "trigger_words": entry.trigger_words}}
        for name, entry in sorted(registry.entries().items()) if entry.kind == "lora"
    ]


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [scheduler], "options": {}} for name, scheduler in A1111_SAMPLERS.items()]


@router.get("/options")
async def options(settings: SettingsDep) -> dict[str, Any]:
    return {"sd_model_checkpoint": settings.default_model}


@router.get("/progress")
async def progress(worker: WorkerDep) -> dict[str, Any]:
    job = worker.current_job()
    waiting = worker.queue_depth()
    if job is None or job.state is not JobState.running:
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"job_count": waiting, "sampling_step": 0, "sampling_steps": 0, "interrupted": False,
                          "job": ""}}
    fraction = job.step / job.total_steps if job.total_steps else 0.0
    return {"progress": round(fraction, 4), "eta_relative": 0.0, "current_image": None, "textinfo": None,
            "state": {"job_count": waiting + 1, "sampling_step": job.step, "sampling_steps": job.total_steps,
                      "interrupted": job.cancel_requested.is_set(), "job": job.id}}


@router.post("/interrupt")
async def interrupt(worker: WorkerDep) -> dict[str, Any]:
    job = worker.current_job()
    if job is not None:
        worker.cancel(job.id)
    return {"interrupted": job.id if job else None}
