"""The earlier servers' routes (seeds 000, 003, 004), translated to the native request and back."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.compat import build_body, none_if_sentinel, png_response_body, resolve_model_alias
from api.deps import RegistryDep, WorkerDep
from api.images import encode_images
from api.routes.generation import execute
from api.schemas import Text2ImgBody
from models.engine import MAX_SEED
from models.errors import InvalidRequest

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
    if loras and "loras" not in Text2ImgBody.model_fields:
        raise InvalidRequest("LoRA adapters are not available in this version of the server")
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
    prompt: Annotated[str, Form()],
    height: Annotated[int, Form()] = 512,
    width: Annotated[int, Form()] = 512,
    num_inference_steps: Annotated[int, Form()] = 50,
    guidance_scale: Annotated[float, Form()] = 7.5,
    control_image: Annotated[UploadFile | None, File()] = None,
) -> Response:
    if control_image is not None and control_image.filename:
        raise InvalidRequest("ControlNet is not available in this version of the server; send no control_image")
    body = build_body(Text2ImgBody, prompt=prompt, width=width, height=height, steps=num_inference_steps,
                      cfg_scale=guidance_scale)
    _, result = await execute(body, request, worker)
    return _png(await png_response_body(result.images[0]), result.seeds)
