"""OpenAI Images API (/v1/images/generations, /v1/images/edits) on top of the native requests."""

from __future__ import annotations

import re
import time
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.compat import build_body, resolve_model_alias, upload_image
from api.deps import RegistryDep, WorkerDep
from api.images import encode_images
from api.routes.generation import execute
from api.schemas import Img2ImgBody, InpaintingBody, Text2ImgBody
from models.errors import InvalidRequest

router = APIRouter(prefix="/v1/images", tags=["compatibility: OpenAI"])
OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini")
_SIZE = re.compile(r"^(\d+)x(\d+)$")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]


class GenerationsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512, or auto")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None or size == "auto":
        return None, None
    match = _SIZE.match(size)
    if not match:
        raise InvalidRequest(f"size must be WIDTHxHEIGHT such as 512x512, or auto (got {size!r})")
    return int(match.group(1)), int(match.group(2))


async def _answer(images: list[Image.Image], response_format: str, output_format: str) -> ImagesResponse:
    encoded = await run_in_threadpool(encode_images, images, output_format)
    if response_format == "url":
        # No public file host here: a data URL carries the image inline where a URL is expected.
        data = [ImageData(url=f"data:image/{output_format};base64,{text}") for text in encoded]
    else:
        data = [ImageData(b64_json=text) for text in encoded]
    return ImagesResponse(created=int(time.time()), data=data)


@router.post("/generations", response_model=ImagesResponse, response_model_exclude_none=True)
async def generations(body: GenerationsBody, request: Request, worker: WorkerDep,
                      registry: RegistryDep) -> ImagesResponse:
    width, height = parse_size(body.size)
    native = build_body(
        Text2ImgBody, prompt=body.prompt, number_of_images=body.n, width=width, height=height,
        model=resolve_model_alias(registry, body.model, ignored=OPENAI_MODELS),
    )
    _, result = await execute(native, request, worker)
    return await _answer(result.images, body.response_format, body.output_format)


def _mask_from_alpha(mask: Image.Image) -> Image.Image:
    """OpenAI masks are transparent where the image should change; ours are white there."""
    if mask.mode in ("RGBA", "LA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda value: 255 if value < 128 else 0)
    return mask.convert("L")


@router.post("/edits", response_model=ImagesResponse, response_model_exclude_none=True)
async def edits(
    request: Request,
    worker: WorkerDep,
    registry: RegistryDep,
    image: Annotated[UploadFile, File()],
    prompt: Annotated[str, Form()],
    mask: Annotated[UploadFile | None, File()] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form()] = 1,
    size: Annotated[str | None, Form()] = None,
    response_format: Annotated[Literal["b64_json", "url"], Form()] = "b64_json",
) -> ImagesResponse:
    width, height = parse_size(size)
    picture = upload_image(await image.read(), "image")
    common = {"prompt": prompt, "number_of_images": n, "width": width, "height": height, "image": picture,
              "model": resolve_model_alias(registry, model, ignored=OPENAI_MODELS)}
    if mask is not None and mask.filename:
        mask_image = _mask_from_alpha(upload_image(await mask.read(), "mask"))
        native = build_body(InpaintingBody, mask_image=mask_image, **common)
    else:
        native = build_body(Img2ImgBody, **common)
    _, result = await execute(native, request, worker)
    return await _answer(result.images, response_format, "png")
