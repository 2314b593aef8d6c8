"""The OpenAI Images API as the `openai` SDK uses it: generations, edits, variations, models, and errors in
OpenAI's shape. Schemas, translate-in, translate-out.

`response_format: "url"` answers with a URL of this server that serves the image without credentials for
URL_LIFETIME_S seconds (as OpenAI's own image URLs expire after an hour): a signed link to the saved image.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from api.compat.shared import build_body, resolve_model_alias
from api.images import encode_images
from api.schemas import GenerationBody, Img2ImgBody, InpaintingBody, Text2ImgBody
from models.errors import InvalidRequest
from models.registry import BASE_KINDS, RegistryEntry
from models.types import JobSnapshot

OPENAI_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5")
MAX_N = 10  # OpenAI's limit per request
URL_LIFETIME_S = 3600
_SIZE = re.compile(r"^(\d+)x(\d+)$")


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str | None = None
    size: str | None = None


class GenerationsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    size: str | None = Field(None, description="WIDTHxHEIGHT, e.g. 512x512, or auto")
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    # sdserve's own additions (send them with the SDK's extra_body): OpenAI's API has no seed or steps.
    seed: int | None = Field(None, description="sdserve: the first image's seed (image i: seed + i).")
    steps: int | None = Field(None, ge=1, description="sdserve: denoising steps (default 30).")


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sdserve"


class ModelsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


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
        save=True if body.response_format == "url" else None, seed=body.seed, steps=body.steps,
    )


def edits_body(
    entries: dict[str, RegistryEntry], images: list[Image.Image], prompt: str, mask: Image.Image | None,
    model: str | None, n: int, size: str | None, response_format: str,
) -> GenerationBody:
    if len(images) != 1:
        raise InvalidRequest(f"this server edits one image per request (got {len(images)}); send a single `image`. "
                             "Composing several reference images into one (gpt-image-1) is not supported", )
    return _img2img(entries, images[0], prompt, mask, model, n, size, response_format)


def variations_body(entries: dict[str, RegistryEntry], image: Image.Image, model: str | None, n: int,
                    size: str | None, response_format: str) -> GenerationBody:
    """A variation is img2img of the image with no prompt, at the default strength (0.75)."""
    return _img2img(entries, image, " ", None, model, n, size, response_format)


def _img2img(
    entries: dict[str, RegistryEntry], image: Image.Image, prompt: str, mask: Image.Image | None, model: str | None,
    n: int, size: str | None, response_format: str,
) -> GenerationBody:
    width, height = parse_size(size)
    common: dict[str, Any] = {
        "prompt": prompt, "number_of_images": n, "width": width, "height": height, "image": image,
        "model": resolve_model_alias(entries, model, ignored=OPENAI_MODELS),
        "save": True if response_format == "url" else None,
    }
    if mask is not None:
        return build_body(InpaintingBody, mask_image=mask_from_alpha(mask), **common)
    return build_body(Img2ImgBody, **common)


def check_n(n: int) -> int:
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"n must be between 1 and {MAX_N} (got {n})")
    return n


def mask_from_alpha(mask: Image.Image) -> Image.Image:
    """OpenAI masks are transparent where the image should change; ours are white there."""
    if mask.mode in ("RGBA", "LA") or "transparency" in mask.info:
        alpha = mask.convert("RGBA").getchannel("A")
        return alpha.point(lambda value: 255 if value < 128 else 0)
    return mask.convert("L")


# -- translate out --------------------------------------------------------------------------------------------------
def images_response(jobs: list[JobSnapshot], urls: list[str] | None) -> ImagesResponse:
    """b64_json answers (urls None) encode the jobs' images; url answers carry the signed links."""
    output_format = jobs[0].options.output_format
    results = [job.result for job in jobs if job.result is not None]
    if urls is not None:
        data = [ImageData(url=url) for url in urls]
    else:
        encoded = [text for result in results for text in encode_images(result.images, output_format)]  # type: ignore[arg-type]
        data = [ImageData(b64_json=text) for text in encoded]
    first = results[0]
    return ImagesResponse(created=int(time.time()), data=data, output_format=output_format,
                          size=f"{first.width}x{first.height}")


def models(entries: dict[str, RegistryEntry]) -> ModelsResponse:
    return ModelsResponse(data=[
        ModelObject(id=name, created=int(entry.created_at.timestamp()) if entry.created_at else 0)
        for name, entry in sorted(entries.items()) if entry.kind in BASE_KINDS
    ])


class UrlSigner:
    """Signed, expiring links to saved images: `requests.get(url)` opens them without the API's credentials,
    and only until they expire. The key is drawn at start-up, so links end with the process too."""

    def __init__(self, lifetime_s: int = URL_LIFETIME_S, key: bytes | None = None):
        self.lifetime_s = lifetime_s
        self._key = key or secrets.token_bytes(32)

    def path(self, image_id: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + self.lifetime_s)
        return f"/v1/images/files/{image_id}?expires={expires}&signature={self._signature(image_id, expires)}"

    def check(self, image_id: str, expires: int, signature: str, now: float | None = None) -> bool:
        fresh = (now or time.time()) <= expires
        return fresh and hmac.compare_digest(signature, self._signature(image_id, expires))

    def _signature(self, image_id: str, expires: int) -> str:
        return hmac.new(self._key, f"{image_id}:{expires}".encode(), hashlib.sha256).hexdigest()


# -- errors in OpenAI's shape ---------------------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
                404: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_exceeded"}
_ERROR_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


class OpenAIError(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape, which its SDK reads into its exceptions (declared for /v1/ in the OpenAPI schema)."""

    error: OpenAIError


def error_body(status: int, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Our error body -> OpenAI's {"error": {message, type, param, code}}, which the SDK reads into its exception.
    Validation problems are 400 there (ours are 422)."""
    status = 400 if status == 422 else status
    errors = body.get("errors") or []
    param = None
    if errors:
        location = [str(part) for part in errors[0].get("loc", ()) if part not in ("body", "query", "path")]
        param = ".".join(location) or None
    code = _ERROR_CODES.get(status) or ("model_not_found" if "known_models" in body else None)
    error = {"message": str(body.get("detail", "error")), "type": _ERROR_TYPES.get(status, "server_error"),
             "param": param, "code": code}
    return status, {"error": error}
