"""What the compatibility routers share: model and sampler names from other servers, image bytes."""

from __future__ import annotations

import io
import re
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from api.images import image_from_bytes
from models.registry import BASE_KINDS, Registry

BodyT = TypeVar("BodyT", bound=BaseModel)

# AUTOMATIC1111 sampler names -> our scheduler names.
A1111_SAMPLERS: dict[str, str] = {
    "Euler a": "euler_a",
    "Euler": "euler",
    "LMS": "lms",
    "LMS Karras": "lms_karras",
    "Heun": "heun",
    "DPM2": "dpm2",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ 2M Karras": "dpmpp_2m_karras",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DDIM": "ddim",
    "DDPM": "ddpm",
    "PLMS": "pndm",
    "UniPC": "unipc",
}
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]+\]$")


def sampler_to_scheduler(sampler: str | None, schedule: str | None = None) -> str | None:
    """'DPM++ 2M' with schedule 'Karras' (newer A1111) or 'DPM++ 2M Karras' (older) -> dpmpp_2m_karras.
    Unknown names pass through, so the native validation answers with the list of choices."""
    if not sampler:
        return None
    if schedule and schedule.lower() == "karras" and f"{sampler} Karras" in A1111_SAMPLERS:
        sampler = f"{sampler} Karras"
    return A1111_SAMPLERS.get(sampler, sampler)


def resolve_model_alias(registry: Registry, value: str | None, ignored: tuple[str, ...] = ()) -> str | None:
    """A registry name, an A1111 title ('name [hash]') or a registered source (an HF repo id) -> a name.
    None, '' and names from `ignored` (e.g. 'dall-e-3') mean the default model. Anything else is returned
    as is, so the native path answers 404 with the registered names."""
    if not value or value in ignored:
        return None
    value = _HASH_SUFFIX.sub("", value.strip())
    entries = registry.entries()
    if value in entries:
        return value
    for name, entry in entries.items():
        if entry.kind in BASE_KINDS and entry.source == value:
            return name
    return value


def none_if_sentinel(value: str | None) -> str | None:
    """Seed 000's forms send the strings 'null' / 'None' / '' for 'not given'."""
    if value is None or value.strip() in ("", "null", "None", "none"):
        return None
    return value


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def png_response_body(image: Image.Image) -> bytes:
    return await run_in_threadpool(png_bytes, image)


def build_body(schema: type[BodyT], /, **fields: Any) -> BodyT:
    """Validate a native body built from another API's fields; problems become the usual readable 422."""
    try:
        return schema.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from error


def upload_image(data: bytes, field: str) -> Image.Image:
    try:
        return image_from_bytes(data)
    except ValueError as error:
        raise RequestValidationError([{"loc": (field,), "msg": str(error), "type": "value_error"}]) from error
