"""The OpenAI Images API (/v1/images/generations, /v1/images/edits): schemas, translate-in, translate-out."""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.compat.shared import build_body, resolve_model_alias
from api.images import encode_images
from api.schemas import GenerationBody, Img2ImgBody, InpaintingBody, Text2ImgBody
from models.errors import InvalidRequest
from models.registry import RegistryEntry
from models.types import JobSnapshot

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


# -- translate in ---------------------------------------------------------------------------------------------------
def generations_body(body: GenerationsBody, entries: dict[str, RegistryEntry]) -> Text2ImgBody:
    width, height = parse_size(body.size)
    return build_body(
        Text2ImgBody, prompt=body.prompt, number_of_images=body.n, width=width, height=height,
        model=resolve_model_alias(entries, body.model, ignored=OPENAI_MODELS), output_format=body.output_format,
    )


def edits_body(
    entries: dict[str, RegistryEntry], image: Image.Image, prompt: str, mask: Image.Image | None, model: str | None,
    n: int, size: str | None,
) -> GenerationBody:
    width, height = parse_size(size)
    common: dict[str, Any] = {
        "prompt": prompt, "number_of_images": n, "width": width, "height": height, "image": image,
        "model": resolve_model_alias(entries, model, ignored=OPENAI_MODELS),
    }
    if mask is not None:
        return build_body(InpaintingBody, mask_image=mask_from_alpha(mask), **common)
    return build_body(Img2ImgBody, **common)


def mask_from_alpha(mask: Image.Image) -> Image.Image:
    """OpenAI masks are transparent where the image should change; ours are white there."""
    if mask.mode in ("RGBA", "LA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda value: 255 if value < 128 else 0)
    return mask.convert("L")


# -- translate out --------------------------------------------------------------------------------------------------
async def images_response(job: JobSnapshot, response_format: str) -> ImagesResponse:
    assert job.result is not None
    output_format = job.options.output_format
    encoded = await run_in_threadpool(encode_images, job.result.images, output_format)  # type: ignore[arg-type]
    if response_format == "url":
        # No public file host here: a data URL carries the image inline where a URL is expected.
        data = [ImageData(url=f"data:image/{output_format};base64,{text}") for text in encoded]
    else:
        data = [ImageData(b64_json=text) for text in encoded]
    return ImagesResponse(created=int(time.time()), data=data)
