"""The AUTOMATIC1111 web UI API subset most clients use: schemas, translate-in, translate-out."""

from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.compat.shared import A1111_SAMPLERS, build_body, resolve_model_alias, sampler_to_scheduler, split_lora_tags
from api.images import Base64Image, Base64ImageList, encode_images
from api.schemas import GenerationBody, Img2ImgBody, InpaintingBody, Text2ImgBody
from models.registry import BASE_KINDS, RegistryEntry
from models.types import JobSnapshot


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
    init_images: Base64ImageList = Field(min_length=1)
    mask: Base64Image | None = None
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0


class GenerationAnswer(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


# -- translate in ---------------------------------------------------------------------------------------------------
def txt2img_body(body: Txt2ImgRequest, entries: dict[str, RegistryEntry]) -> GenerationBody:
    return build_body(Text2ImgBody, **_native_fields(body, entries))


def img2img_body(body: Img2ImgRequest, entries: dict[str, RegistryEntry]) -> GenerationBody:
    fields = _native_fields(body, entries) | {"image": body.init_images[0], "strength": body.denoising_strength}
    if body.mask is None:
        return build_body(Img2ImgBody, **fields)
    mask = body.mask.convert("L")
    if body.inpainting_mask_invert:
        mask = mask.point(lambda value: 255 - value)
    return build_body(InpaintingBody, mask_image=mask, **fields)


def _native_fields(body: Txt2ImgRequest, entries: dict[str, RegistryEntry]) -> dict[str, Any]:
    prompt, loras = split_lora_tags(body.prompt)
    return {
        "prompt": prompt or " ",
        "loras": loras or None,
        "negative_prompt": body.negative_prompt or None,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "seed": body.seed,
        "number_of_images": body.batch_size * body.n_iter,
        "scheduler": sampler_to_scheduler(body.sampler_name or body.sampler_index, body.scheduler),
        "model": resolve_model_alias(entries, _checkpoint(body.override_settings)),
    }


def _checkpoint(override_settings: dict[str, Any]) -> str | None:
    checkpoint = override_settings.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise RequestValidationError([{"loc": ("override_settings", "sd_model_checkpoint"), "type": "string_type",
                                       "msg": "must be a model name (a string)"}])
    return checkpoint


# -- translate out --------------------------------------------------------------------------------------------------
async def generation_answer(body: Txt2ImgRequest, job: JobSnapshot) -> GenerationAnswer:
    result = job.result
    assert result is not None
    images = await run_in_threadpool(encode_images, result.images, "png")
    info = {
        "prompt": job.prompt, "negative_prompt": job.negative_prompt or "", "seed": result.seeds[0],
        "all_seeds": result.seeds, "all_prompts": [job.prompt] * len(result.seeds), "width": result.width,
        "height": result.height, "steps": result.steps, "cfg_scale": result.guidance_scale,
        "sampler_name": body.sampler_name or result.scheduler, "sd_model_name": result.model,
        "denoising_strength": result.strength, "batch_size": body.batch_size,
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return GenerationAnswer(images=images, parameters=parameters, info=json.dumps(info))


def sd_models(entries: dict[str, RegistryEntry]) -> list[dict[str, Any]]:
    return [
        {"title": name, "model_name": name, "hash": (entry.sha256 or "")[:10] or None, "sha256": entry.sha256,
         "filename": entry.source, "config": None}
        for name, entry in sorted(entries.items()) if entry.kind in BASE_KINDS
    ]


def loras(entries: dict[str, RegistryEntry]) -> list[dict[str, Any]]:
    return [
        {"name": name, "alias": name, "path": entry.source,
         "metadata": {"base": entry.base, "trigger_words": entry.trigger_words}}
        for name, entry in sorted(entries.items()) if entry.kind == "lora"
    ]


def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [scheduler], "options": {}} for name, scheduler in A1111_SAMPLERS.items()]


def progress(job: JobSnapshot | None, waiting: int) -> dict[str, Any]:
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"job_count": waiting, "sampling_step": 0, "sampling_steps": 0, "interrupted": False,
                          "job": ""}}
    fraction = job.step / job.total_steps if job.total_steps else 0.0
    return {"progress": round(fraction, 4), "eta_relative": 0.0, "current_image": None, "textinfo": None,
            "state": {"job_count": waiting + 1, "sampling_step": job.step, "sampling_steps": job.total_steps,
                      "interrupted": job.cancel_requested, "job": job.id}}
