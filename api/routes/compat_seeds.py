"""The earlier servers' routes (seeds 000, 003, 004), translated to the native request and back."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.compat import build_body, none_if_sentinel, png_response_body, resolve_model_alias, upload_image
from api.controlnet_schemas import (
    ActiveControlNets,
    LoadControlNetCompatBody,
    LoadControlNetCompatResponse,
    LoadedControlNet,
    UnloadControlNetResponse,
)
from api.deps import RegistryDep, SettingsDep, WorkerDep
from api.images import encode_image, encode_images
from api.routes.generation import execute
from api.routes.loras import request_fields
from api.schemas import Text2ImgBody
from models.engine import MAX_SEED
from models.errors import ControlNetNotFound, InvalidRequest
from models.lora_calls import preloaded_lora_names
from models.pipelines import PipelineCache

router = APIRouter(tags=["compatibility: earlier servers"])
SEED_000_DEFAULT_MODEL = "runwayml/stable-diffusion-v1-5"


def _png(content: bytes, seeds: list[int]) -> Response:
    return Response(content, media_type="image/png", headers={"X-Seeds": ",".join(map(str, seeds))})


@router.post("/submit", response_class=Response, summary="Seed 000's form: one PNG back")
async def submit(
    request: Request,
    worker: WorkerDep,
    registry: RegistryDep,
    text_prompt: Annotated[str, Form()],
    manual_seed: Annotated[int, Form()],
    modelid: Annotated[str, Form()] = SEED_000_DEFAULT_MODEL,
    total_nm_img_prompt: Annotated[int, Form()] = 1,
    inference_steps: Annotated[int, Form()] = 30,
    guidance_scale: Annotated[float, Form()] = 7.5,
    negative_prompt: Annotated[str | None, Form()] = None,
    strength: Annotated[float, Form()] = 1.0,
    lora_hugging_face_1: Annotated[str | None, Form()] = None,
    weight_name_1: Annotated[str | None, Form()] = None,
    lora_hugging_face_2: Annotated[str | None, Form()] = None,
    weight_name_2: Annotated[str | None, Form()] = None,
    cross_attention_kwargs: Annotated[float | None, Form()] = 1.0,
) -> Response:
    loras = [
        {"name": none_if_sentinel(path), "weight_name": none_if_sentinel(weight), "scale": cross_attention_kwargs}
        for path, weight in ((lora_hugging_face_1, weight_name_1), (lora_hugging_face_2, weight_name_2))
        if none_if_sentinel(path)
    ]
    body = build_body(
        Text2ImgBody,
        prompt=text_prompt,
        negative_prompt=none_if_sentinel(negative_prompt),
        model=resolve_model_alias(registry, modelid, ignored=(SEED_000_DEFAULT_MODEL,)),
        number_of_images=total_nm_img_prompt,
        steps=inference_steps,
        cfg_scale=guidance_scale,
        seed=manual_seed,
        loras=loras or None,
    )
    _, result = await execute(body, request, worker)
    return _png(await png_response_body(result.images[0]), result.seeds)


class ImagineBody(BaseModel):
    """Seed 004's request: the optimizedSD names."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    H: int = Field(512, description="height")
    W: int = Field(512, description="width")
    ddim_steps: int = 50
    n_samples: int = Field(1, ge=1, description="images per iteration")
    n_iter: int = Field(1, ge=1, description="iterations")
    scale: float = Field(7.5, description="guidance scale")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)


@router.post("/imagine", summary="Seed 004: a PNG stream (Accept: image/png) or a JSON array of base64 images")
async def imagine(body: ImagineBody, request: Request, worker: WorkerDep) -> Any:
    native = build_body(
        Text2ImgBody, prompt=body.prompt, width=body.W, height=body.H, steps=body.ddim_steps,
        number_of_images=body.n_samples * body.n_iter, cfg_scale=body.scale, seed=body.seed,
    )
    _, result = await execute(native, request, worker)
    if "image/png" in request.headers.get("accept", ""):
        return _png(await png_response_body(result.images[0]), result.seeds)
    return await run_in_threadpool(encode_images, result.images, "png")


@router.post("/generate-image/", response_class=Response, summary="Seed 003's form: one PNG back")
@router.post("/generate-image", response_class=Response, include_in_schema=False)
async def generate_image(
    request: Request,
    worker: WorkerDep,
    settings: SettingsDep,
    prompt: Annotated[str, Form()],
    height: Annotated[int, Form()] = 512,
    width: Annotated[int, Form()] = 512,
    num_inference_steps: Annotated[int, Form()] = 50,
    guidance_scale: Annotated[float, Form()] = 7.5,
    control_image: Annotated[UploadFile | None, File()] = None,
) -> Response:
    # Seed 003 loads LoRAs into its live pipeline with /load-lora/; they apply to every generation after that.
    model = settings.default_model
    preloaded = await asyncio.wrap_future(worker.call(lambda cache: preloaded_lora_names(cache, model)))
    controlnet = None
    if control_image is not None and control_image.filename:
        # Like seed 003: a control image runs the ControlNet loaded last with /load-controlnet/.
        name = await asyncio.wrap_future(worker.call(lambda cache: cache.controlnets.latest_preloaded()))
        if name is None:
            raise InvalidRequest("a control_image needs a ControlNet: load one first with POST /load-controlnet/ "
                                 "(controlnet_path=demo-controlnet, for example), or send no control_image")
        image = upload_image(await control_image.read(), "control_image")
        controlnet = {"name": name, "image": await run_in_threadpool(encode_image, image)}
    body = build_body(Text2ImgBody, prompt=prompt, width=width, height=height, steps=num_inference_steps,
                      cfg_scale=guidance_scale, loras=[{"name": name} for name in preloaded] or None,
                      controlnet=controlnet)
    _, result = await execute(body, request, worker)
    return _png(await png_response_body(result.images[0]), result.seeds)


@router.post("/load-controlnet/", response_model=LoadControlNetCompatResponse,
             summary="Seed 003: load a ControlNet for /generate-image/'s control_image")
@router.post("/load-controlnet", response_model=LoadControlNetCompatResponse, include_in_schema=False)
async def load_controlnet(request: Request, worker: WorkerDep, settings: SettingsDep) -> LoadControlNetCompatResponse:
    body = build_body(LoadControlNetCompatBody, **await request_fields(request))
    if body.lora_weights_path:
        raise InvalidRequest("ControlLoRA not supported: load a full diffusers ControlNet (send no lora_weights_path)")
    model = settings.default_model

    def load(cache: PipelineCache) -> LoadedControlNet:
        # Checked against the default base, which /generate-image/ runs on: one that does not fit is refused now.
        _, base = cache.get(model, "text2img")
        return LoadedControlNet.from_domain(
            cache.controlnets.preload(body.controlnet_path, body.adapter_name, check_against=base)
        )

    loaded = await asyncio.wrap_future(worker.call(load))
    return LoadControlNetCompatResponse(message=f"ControlNet {loaded.name!r} loaded from {loaded.source}",
                                        **loaded.model_dump())


@router.get("/active-controlnets/", response_model=ActiveControlNets, summary="Seed 003: the loaded ControlNets")
@router.get("/active-controlnets", response_model=ActiveControlNets, include_in_schema=False)
async def active_controlnets(worker: WorkerDep) -> ActiveControlNets:
    infos = await asyncio.wrap_future(worker.call(lambda cache: cache.controlnets.loaded()))
    return ActiveControlNets(active_controlnets=[info.name for info in infos],
                             controlnets=[LoadedControlNet.from_domain(info) for info in infos])


@router.delete("/unload-controlnet/", response_model=UnloadControlNetResponse, summary="Seed 003: unload a ControlNet")
@router.delete("/unload-controlnet", response_model=UnloadControlNetResponse, include_in_schema=False)
async def unload_controlnet(request: Request, worker: WorkerDep) -> UnloadControlNetResponse:
    fields = await request_fields(request)
    model_key = fields.get("model_key")
    if not isinstance(model_key, str) or not model_key:
        raise RequestValidationError([{"loc": ("model_key",), "msg": "Field required", "type": "missing"}])

    def unload(cache: PipelineCache) -> tuple[bool, list[str]]:
        return cache.controlnets.unload(model_key), [info.name for info in cache.controlnets.loaded()]

    unloaded, remaining = await asyncio.wrap_future(worker.call(unload))
    if not unloaded:
        raise ControlNetNotFound(f"no ControlNet {model_key!r} is loaded; loaded: {', '.join(remaining) or 'none'}")
    return UnloadControlNetResponse(message=f"ControlNet {model_key!r} unloaded")
