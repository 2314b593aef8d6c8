"""The app factory: the lifespan builds the engine once and puts it on app.state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.compat import openai
from api.compat.a1111 import A1111State
from api.compat.openai import UrlSigner
from api.compat.random_diffusion import RandomRuns
from api.errors import register_error_handlers
from api.observability import MetricsMiddleware, RequestIdMiddleware
from api.routes import (
    compat_a1111,
    compat_openai,
    compat_seeds,
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
    app.include_router(generation.router)
    app.include_router(jobs.router)
    app.include_router(images.router)
    app.include_router(models.router)
    app.include_router(system.router)
    app.include_router(loras.router)
    app.include_router(compat_seeds.router)
    app.include_router(compat_openai.router)
    app.include_router(compat_a1111.router)
    app.include_router(compat_a1111.controlnet_router)
    app.include_router(observability.router)
    app.include_router(training.router)
    mount_page(app)
    # Added last = outermost: the request id is set before metrics and everything else run.
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
