"""The one table from domain errors to HTTP answers, and readable validation errors."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from models.errors import (
    AdapterNotFound,
    ControlNetNotFound,
    ImageNotFound,
    InvalidRequest,
    JobCancelled,
    JobFinished,
    JobNotFound,
    ModelInUse,
    ModelNotFound,
    ModelUnavailable,
    NotReady,
    PathNotAllowed,
    QueueFull,
    RegistryError,
    RegistryUnavailable,
    SdserveError,
    TrainingRunNotFound,
)

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[SdserveError], int] = {
    InvalidRequest: 422,
    RegistryError: 422,
    RegistryUnavailable: 503,
    ModelInUse: 409,
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


class ErrorBody(BaseModel):
    """Every error answer: one sentence a person can act on."""

    detail: str = Field(description="What went wrong and what to do about it.")


class ValidationProblem(BaseModel):
    loc: list[str | int] = Field(description="Where: body, query or path, then the field.")
    msg: str
    type: str


class ValidationErrorBody(ErrorBody):
    """A 422: `detail` names each field and why (as one string); `errors` lists them for programs."""

    errors: list[ValidationProblem] = Field(default_factory=list)


class ModelNotFoundBody(ErrorBody):
    known_models: list[str] | None = Field(None, description="With an unknown model: the registered ones.")


ERROR_MODELS = (ErrorBody, ValidationErrorBody, ModelNotFoundBody)


def _error(description: str, model: type[BaseModel] = ErrorBody, headers: dict[str, Any] | None = None) -> dict:
    # Always JSON, also on routes whose success is a PNG or an event stream: a `model` would take their media type.
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
    }
    if headers:
        answer["headers"] = headers
    return answer


# The statuses any route may answer besides its own success, declared once for every router (create_app), so
# that clients generated from /openapi.json know every shape they can get.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("The Host header names a host this server does not answer to (SDSERVE_ALLOWED_HOSTS)."),
    401: _error("An API key is needed (Authorization: Bearer KEY, X-API-Key: KEY or basic auth).",
                headers={"WWW-Authenticate": {"schema": {"type": "string"}}}),
    403: _error("Not allowed: an admin key is needed, another key's job, a cross-site request, or a path outside "
                "the allowed folders."),
    404: _error("Not found: unknown model (with `known_models`), job, image, LoRA, ControlNet or run.",
                ModelNotFoundBody),
    409: _error("Conflicts with the current state: the job is over, the model is the default one."),
    413: _error("The request body is larger than SDSERVE_MAX_BODY_BYTES."),
    422: _error("Invalid input; `detail` says which field and why.", ValidationErrorBody),
    429: _error("The queue is full; retry after Retry-After seconds.",
                headers={"Retry-After": {"schema": {"type": "integer"}}}),
    500: _error("An unexpected error, logged with the request id (X-Request-ID)."),
    503: _error("Not available now: the model is loading or cannot be loaded here, the registry file is broken, "
                "or the server is shutting down."),
}


def document_errors(app: FastAPI) -> None:
    """Put the error bodies that ERROR_RESPONSES refers to into the OpenAPI schema's components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in ERROR_MODELS:
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


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
    return JSONResponse(body, status_code=status, headers=headers)


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
    return JSONResponse({"detail": "; ".join(problems), "errors": errors}, status_code=422)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    """Starlette's and FastAPI's own errors (401, 403, 404 of unknown paths, 405, 413) in the same shape."""
    assert isinstance(error, HTTPException)
    detail = error.detail if isinstance(error.detail, str) else str(error.detail)
    return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)


async def _unexpected_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error; see the server log"}, status_code=500)


def register_error_handlers(app: FastAPI) -> None:
    document_errors(app)
    app.add_exception_handler(SdserveError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
