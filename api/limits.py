"""Bounds on what the input images of one request may make the server hold.

The body itself is bounded by FastAPI's own `max_body_size` (create_app sets it from SDSERVE_MAX_BODY_BYTES: a
413 from the Content-Length, or while a streamed body arrives, before it has been read whole). Here,
`InputBudgetMiddleware` (pure ASGI) gives each request a fresh `InputBudget`, which the image decoder
(api/images.py) charges with every image's pixel count, read from the image's header before its pixels are
decoded, and which image lists check their length against before any of their images is decoded.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from models.settings import Settings


@dataclass
class InputBudget:
    """What the input images of one request may still decode."""

    max_pixels: int
    max_images: int
    used_pixels: int = 0

    def charge(self, width: int, height: int) -> None:
        """Count an image about to be decoded; ValueError (a 422 naming the field) when it is over the budget."""
        self.used_pixels += width * height
        if self.used_pixels > self.max_pixels:
            raise ValueError(
                f"image is {width}x{height}: the input images of one request may hold at most {self.max_pixels} "
                "pixels together (SDSERVE_MAX_INPUT_PIXELS)"
            )

    def check_count(self, count: int) -> None:
        if count > self.max_images:
            raise ValueError(f"{count} images in one list; at most {self.max_images} (SDSERVE_MAX_INPUT_IMAGES)")


_DEFAULTS = Settings.model_fields
budget_var: ContextVar[InputBudget | None] = ContextVar("sdserve_input_budget", default=None)


def current_budget() -> InputBudget:
    """This request's budget; outside a request (a schema validated by hand) a fresh one with the defaults."""
    budget = budget_var.get()
    if budget is None:
        return InputBudget(_DEFAULTS["max_input_pixels"].default, _DEFAULTS["max_input_images"].default)
    return budget


class InputBudgetMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.max_pixels = settings.max_input_pixels
        self.max_images = settings.max_input_images

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = budget_var.set(InputBudget(self.max_pixels, self.max_images))
        try:
            await self.app(scope, receive, send)
        finally:
            budget_var.reset(token)


def body_too_large(settings: Settings) -> str:
    return f"the request body is larger than {settings.max_body_bytes} bytes (SDSERVE_MAX_BODY_BYTES)"
