"""Bounds on what one request may make the server hold: its body, and the pixels and images it decodes.

`LimitsMiddleware` (pure ASGI) answers 413 as soon as a body is known to be too big: at once from its
Content-Length, or while a streamed (chunked) body arrives, before it has been read whole. (Starlette's own body
limit answers a declared Content-Length in plain text, outside the request id and the error shape; this one
answers like every other error.) It also gives each request a fresh `InputBudget`, which the image decoder
(api/images.py) charges with every image's pixel count, read from the image's header before its pixels are
decoded, and which image lists check their length against before any of their images is decoded.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
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


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes (SDSERVE_MAX_BODY_BYTES)")


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.max_body = settings.max_body_bytes
        # A dataset upload (POST /datasets/{name}) may be as large as the dataset it unpacks to, plus the form's
        # framing; every other body keeps the general limit.
        self.max_dataset_body = max(settings.max_body_bytes, settings.dataset_max_bytes + 2**20)
        self.max_pixels = settings.max_input_pixels
        self.max_images = settings.max_input_images

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_body
        if scope["method"] == "POST" and scope["path"].startswith("/datasets/"):
            limit = self.max_dataset_body
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        token = budget_var.set(InputBudget(self.max_pixels, self.max_images))
        try:
            await self.app(scope, counting_receive, watching_send)
        except BodyTooLarge:
            # Raised where the app reads the body; the routes' own handlers usually answer it, this is the rest.
            if started:
                raise
            await _too_large(limit)(scope, receive, send)
        finally:
            budget_var.reset(token)


def _too_large(limit: int) -> ASGIApp:
    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(scope, 413, {"detail": BodyTooLarge(limit).detail}, {"Connection": "close"})
        await response(scope, receive, send)

    return answer
