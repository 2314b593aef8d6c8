"""The app factory: the lifespan builds the engine once and puts it on app.state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api.compat import openai
from api.compat.a1111 import A1111State
from api.compat.openai import OpenAIErrorBody, UrlSigner
from api.compat.random_diffusion import RandomRuns
from api.errors import ERROR_RESPONSES, error_responses, register_error_handlers
from api.limits import LimitsMiddleware
from api.observability import MetricsMiddleware, RequestIdMiddleware
from api.routes import (
    compat_a1111,
    compat_openai,
    compat_seeds,
    datasets,
    generation,
    images,
    jobs,
    loras,
    models,
    observability,
    system,
    training,
)
from api.routes.ui import mount_page
from api.security import API_KEY_HEADER, SecurityMiddleware, authorize, warn_if_exposed
from api.serving import Answers
from models.engines import open_engine
from models.interface import EngineClient
from models.logcontext import configure_logging
from models.settings import Settings, get_settings
from training.runs import TrainingRunManager

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: EngineClient | None = None) -> FastAPI:
    """The app. `engine` replaces the one the settings ask for (tests give a fake one)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.engine = engine or open_engine(settings)
        app.state.answers = Answers()
        app.state.training = TrainingRunManager(settings)
        await app.state.engine.start()
        app.state.training.start()
        warn_if_exposed(settings)
        logger.info("sdserve ready to take requests; default model %r", settings.default_model)
        try:
            yield
        finally:
            app.state.training.stop()
            await app.state.engine.stop()

    app = FastAPI(
        title="sdserve",
        version="0.1.0",
        description="Stable Diffusion inference with a model registry. Images are base64 in JSON.",
        lifespan=lifespan,
    )
    # OpenAI's clients read errors as {"error": {...}}; every other route keeps {"detail": ...}.
    register_error_handlers(app, shapes={"/v1/": openai.error_body})
    # What compatibility surfaces keep between requests, per process: A1111's options, signed image links,
    # seed 001's runs.
    app.state.a1111 = A1111State()
    app.state.url_signer = UrlSigner()
    app.state.random_runs = RandomRuns()
    # Every router: a key when keys are configured, an admin key for what changes the server (api/security.py),
    # and the error statuses every route may answer, declared once.
    # OpenAI answers invalid input with 400, never 422: "4XX" keeps FastAPI from declaring its own 422 there.
    openai_errors = error_responses(models={}, default=OpenAIErrorBody,
                                    statuses=(400, 401, 403, 404, 409, 413, 429, "4XX", 500, 503))
    for router in (generation.router, jobs.router, images.router, models.router, system.router, loras.router,
                   compat_seeds.router, compat_openai.router, compat_a1111.router, compat_a1111.controlnet_router,
                   observability.router, training.router, datasets.router):
        access = authorize(settings, public=router is system.router)  # /health: what load balancers probe
        responses = openai_errors if router is compat_openai.router else ERROR_RESPONSES
        app.include_router(router, dependencies=access, responses=responses)
    mount_page(app)
    # Added first = innermost. From the outside in: the request id, metrics, CORS answers (only for configured
    # origins), Host / cross-site / key checks, then the body limit and the input images' budget.
    app.add_middleware(LimitsMiddleware, settings=settings)
    app.add_middleware(SecurityMiddleware, settings=settings)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.allowed_origins, allow_methods=["*"],
            allow_headers=["Authorization", API_KEY_HEADER, "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After", "Location", "X-Seeds"],
        )
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
