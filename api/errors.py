"""The one table from domain errors to HTTP answers, and readable validation errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import (
    AdapterNotFound,
    ControlNetNotFound,
    ImageNotFound,
    InvalidRequest,
    JobCancelled,
    JobFinished,
    JobNotFound,
    ModelNotFound,
    ModelUnavailable,
    NotReady,
    PathNotAllowed,
    QueueFull,
    RegistryError,
    SdserveError,
    TrainingRunNotFound,
)

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[SdserveError], int] = {
    InvalidRequest: 422,
    RegistryError: 422,
    ModelNotFound: 404,
    AdapterNotFound: 404,
    PathNotAllowed: 403,
    QueueFull: 429,
    JobCancelled: 409,
    ModelUnavailable: 503,
    NotReady: 503,
    JobNotFound: 404,
    ImageNotFound: 404,
    JobFinished: 409,
    TrainingRunNotFound: 404,
    ControlNetNotFound: 404,
}


def status_for(error: SdserveError) -> int:
    for error_type in type(error).__mro__:
        if error_type in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[error_type]
    return 500


async def _domain_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, SdserveError)
    status = status_for(error)
    headers = {"Retry-After": str(error.retry_after_s)} if isinstance(error, QueueFull) else None
    body: dict[str, object] = {"detail": str(error)}
    if isinstance(error, ModelNotFound):
        body["known_models"] = error.known
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status, error)
    return _respond(request, status, body, headers)


def _describe(error: dict) -> str:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    where = ".".join(location) or "request"
    message = error.get("msg", "is invalid")
    message = message.removeprefix("Value error, ")
    if error.get("type") == "missing":
        return f"{where}: is required"
    if "input" in error and error.get("type") not in ("missing",) and not isinstance(error["input"], dict | list):
        shown = repr(error["input"])
        if len(shown) <= 60:
            return f"{where}: {message} (got {shown})"
    return f"{where}: {message}"


async def _validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    problems = [_describe(item) for item in error.errors()]
    errors = [{k: v for k, v in item.items() if k in ("loc", "msg", "type")} for item in error.errors()]
    return _respond(request, 422, {"detail": "; ".join(problems), "errors": errors})


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _respond(request, 500, {"detail": "internal server error; see the server log"})


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI's own answer to HTTPException (unknown route, wrong method, ...), through the same shaping."""
    assert isinstance(error, StarletteHTTPException)
    return _respond(request, error.status_code, {"detail": error.detail}, getattr(error, "headers", None))


# A compatibility surface whose clients read errors in another shape: (status, native body) -> (status, body).
ErrorShape = Callable[[int, dict[str, Any]], tuple[int, dict[str, Any]]]


def _respond(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
             ) -> JSONResponse:
    for prefix, shape in getattr(request.app.state, "error_shapes", {}).items():
        if request.url.path.startswith(prefix):
            status, body = shape(status, body)
            break
    return JSONResponse(body, status_code=status, headers=headers)


def register_error_handlers(app: FastAPI, shapes: dict[str, ErrorShape] | None = None) -> None:
    """One table for every route; `shapes` maps a path prefix to another error shape (OpenAI's for /v1/)."""
    app.state.error_shapes = shapes or {}
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(SdserveError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
