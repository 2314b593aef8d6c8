"""Image text at the API boundary: base64 / data URL in, PIL out (or a clear 422); PIL in, base64 out."""

from __future__ import annotations

import base64
import binascii
import io
import re
from typing import Annotated, Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BeforeValidator, WithJsonSchema

from api.limits import current_budget

MAX_IMAGE_BASE64_CHARS = 40 * 2**20
MAX_IMAGE_PIXELS = 4096 * 4096
OutputFormat = Literal["png", "jpeg", "webp"]
# Modes every step after decoding can convert (to RGB, L, RGBA); others (LAB, HSV, I;16, ...) become RGB here.
PLAIN_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA"})
_DATA_URL = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.IGNORECASE)


def decode_image(value: Any) -> Image.Image:
    """Turn base64 text (plain or a data URL) into a loaded PIL image; ValueError says what is wrong."""
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, str):
        raise ValueError("must be a base64-encoded image (a string), optionally a data URL")
    if len(value) > MAX_IMAGE_BASE64_CHARS:
        raise ValueError(f"image is too large ({len(value)} base64 characters; at most {MAX_IMAGE_BASE64_CHARS})")
    text = _DATA_URL.sub("", value.strip(), count=1)
    text = "".join(text.split())
    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise ValueError("is not valid base64") from error
    return image_from_bytes(raw)


def image_from_bytes(raw: bytes) -> Image.Image:
    """Open and fully load an uploaded image; ValueError (a 422) when it is empty, huge, over the request's pixel
    budget or not an image. Its size is read from the header and charged before any pixel is decoded."""
    if not raw:
        raise ValueError("is empty")
    try:
        with Image.open(io.BytesIO(raw)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError(f"image is {width}x{height}, more pixels than allowed ({MAX_IMAGE_PIXELS})")
            current_budget().charge(width, height)
            opened.load()
            image = opened.copy()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as error:
        raise ValueError("is base64 but not an image PIL can read (PNG, JPEG, WebP, ...)") from error
    return plain_mode(image)


def plain_mode(image: Image.Image) -> Image.Image:
    """An image in a mode the pipelines and masks can convert from: exotic modes (LAB, HSV, 16-bit, float) are
    turned into RGB here, or refused when PIL cannot convert them."""
    if image.mode in PLAIN_MODES:
        return image
    try:
        return image.convert("RGBA" if "A" in image.getbands() else "RGB")
    except ValueError as error:
        raise ValueError(f"image mode {image.mode} is not supported; send an RGB, RGBA or grayscale image") \
            from error


def check_image_count(value: Any) -> Any:
    """An image list's length is checked before any of its images is decoded."""
    if isinstance(value, list):
        current_budget().check_count(len(value))
    return value


Base64Image = Annotated[
    Image.Image,
    BeforeValidator(decode_image),
    WithJsonSchema({"type": "string", "description": "Base64-encoded image (PNG, JPEG, WebP) or a data URL"}),
]
# A list of images (AUTOMATIC1111's init_images): at most SDSERVE_MAX_INPUT_IMAGES, counted before decoding.
Base64ImageList = Annotated[list[Base64Image], BeforeValidator(check_image_count)]


def encode_image(image: Image.Image, output_format: OutputFormat = "png", quality: int = 92) -> str:
    # PIL keeps save options on the image object; a cached result may be encoded by two requests at once.
    image = image.copy()
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG")
    elif output_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_images(images: list[Image.Image], output_format: OutputFormat = "png") -> list[str]:
    return [encode_image(image, output_format) for image in images]
