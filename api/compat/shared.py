"""What the compatibility surfaces share: model and sampler names from other servers, image bytes, loose fields."""

from __future__ import annotations

import io
import re
from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from api.images import image_from_bytes
from models.registry import BASE_KINDS, RegistryEntry

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
_LORA_TAG = re.compile(r"<lora:([^:>]+)(?::([-+]?\d*\.?\d+))?[^>]*>")


def split_lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """AUTOMATIC1111 prompts name LoRAs inline as <lora:name:0.8>; take them out as request LoRAs."""
    loras = [
        {"name": match.group(1).strip(), "scale": float(match.group(2)) if match.group(2) else 1.0}
        for match in _LORA_TAG.finditer(prompt)
    ]
    return " ".join(_LORA_TAG.sub(" ", prompt).split()), loras


def sampler_to_scheduler(sampler: str | None, schedule: str | None = None) -> str | None:
    """'DPM++ 2M' with schedule 'Karras' (newer A1111) or 'DPM++ 2M Karras' (older) -> dpmpp_2m_karras.
    Unknown names pass through, so the native validation answers with the list of choices."""
    if not sampler:
        return None
    if schedule and schedule.lower() == "karras" and f"{sampler} Karras" in A1111_SAMPLERS:
        sampler = f"{sampler} Karras"
    return A1111_SAMPLERS.get(sampler, sampler)


def resolve_model_alias(
    entries: dict[str, RegistryEntry], value: str | None, ignored: tuple[str, ...] = ()
) -> str | None:
    """A registry name, an A1111 title ('name [hash]') or a registered source (an HF repo id) -> a name.
    None, '' and names from `ignored` (e.g. 'dall-e-3') mean the default model. Anything else is returned
    as is, so the native path answers 404 with the registered names."""
    if not value or value in ignored:
        return None
    value = _HASH_SUFFIX.sub("", value.strip())
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


async def request_fields(request: Request) -> dict[str, Any]:
    """Seed 003 clients send their fields as query parameters, a form or JSON: take whichever came."""
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
