"""The one table from domain errors to HTTP answers, and readable validation errors."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from models.errors import (
    AdapterNotFound,
    Conflict,
    ControlNetNotFound,
    DatasetNotFound,
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
    PayloadTooLarge,
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
    Conflict: 409,
    DatasetNotFound: 404,
    PayloadTooLarge: 413,
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


# Models referred to by the tables below; document_errors puts them into the OpenAPI schema's components.
_DOCUMENTED: dict[str, type[BaseModel]] = {}
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "The Host header names a host this server does not answer to (SDSERVE_ALLOWED_HOSTS).",
    401: "An API key is needed (Authorization: Bearer KEY, X-API-Key: KEY or basic auth).",
    403: "Not allowed: an admin key is needed, another key's job, a cross-site request, or a path outside the "
         "allowed folders.",
    404: "Not found: unknown model (with `known_models`), job, image, LoRA, ControlNet or run.",
    409: "Conflicts with the current state: the job is over, the model is the default one.",
    413: "The request body is larger than SDSERVE_MAX_BODY_BYTES.",
    422: "Invalid input; `detail` says which field and why.",
    429: "The queue is full; retry after Retry-After seconds.",
    500: "An unexpected error, logged with the request id (X-Request-ID).",
    503: "Not available now: the model is loading or cannot be loaded here, the registry file is broken, or the "
         "server is shutting down.",
}
_HEADERS = {401: {"WWW-Authenticate": {"schema": {"type": "string"}}},
            429: {"Retry-After": {"schema": {"type": "integer"}}}}


def error_responses(models: dict[int | str, type[BaseModel]] | None = None, default: type[BaseModel] = ErrorBody,
                    statuses: tuple[int | str, ...] = tuple(ERROR_DESCRIPTIONS)) -> dict[int | str, dict[str, Any]]:
    """The error statuses a router's routes may answer and their bodies, for `include_router(responses=...)`.
    Always JSON, also on routes whose success is a PNG or an event stream (a `model` would take their media
    type)."""
    models = {404: ModelNotFoundBody, 422: ValidationErrorBody} if models is None else models
    table: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        model = models.get(status, default)
        _DOCUMENTED[model.__name__] = model
        schema = {"$ref": f"#/components/schemas/{model.__name__}"}
        table[status] = {"description": ERROR_DESCRIPTIONS.get(status, "Any other refusal of the request."),  # type: ignore[call-overload]
                         "content": {"application/json": {"schema": schema}}}
        if status in _HEADERS:
            table[status]["headers"] = _HEADERS[status]
    return table


# The statuses any native route may answer besides its own success, declared once for every router (create_app).
ERROR_RESPONSES = error_responses()


def document_errors(app: FastAPI) -> None:
    """Put the error bodies that the tables refer to into the OpenAPI schema's components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _DOCUMENTED.items():
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[name] = definition
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
    """FastAPI's own answer to HTTPException (unknown route, wrong method, 401, 403, 413), through the same
    shaping; `detail` is always a string."""
    assert isinstance(error, StarletteHTTPException)
    detail = error.detail if isinstance(error.detail, str) else str(error.detail)
    return _respond(request, error.status_code, {"detail": detail}, getattr(error, "headers", None))


# A compatibility surface whose clients read errors in another shape: (status, native body) -> (status, body).
ErrorShape = Callable[[int, dict[str, Any]], tuple[int, dict[str, Any]]]


def _respond(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
             ) -> JSONResponse:
    return error_response(request.scope, status, body, headers)


def error_response(scope: Scope, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """An error answer in the shape of the surface the path belongs to; the middlewares answer through it too."""
    app = scope.get("app")
    for prefix, shape in getattr(getattr(app, "state", None), "error_shapes", {}).items():
        if scope["path"].startswith(prefix):
            status, body = shape(status, body)
            break
    return JSONResponse(body, status_code=status, headers=headers)


def register_error_handlers(app: FastAPI, shapes: dict[str, ErrorShape] | None = None) -> None:
    """One table for every route; `shapes` maps a path prefix to another error shape (OpenAI's for /v1/)."""
    app.state.error_shapes = shapes or {}
    document_errors(app)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(SdserveError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
