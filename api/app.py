"""The app factory: the lifespan builds the engine once and puts it on app.state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import register_error_handlers
from api.routes import generation, models, system, training
from models.device import select_device
from models.pipelines import PipelineCache
from models.registry import Registry
from models.settings import Settings, get_settings
from models.training_runs import TrainingRunManager
from models.worker import GenerationWorker

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings.registry_path)
        device = select_device(settings)
        worker = GenerationWorker(settings, PipelineCache(settings, registry, device))
        app.state.settings = settings
        app.state.registry = registry
        app.state.device = device
        app.state.worker = worker
        app.state.training = TrainingRunManager(settings, registry)
        worker.start()
        app.state.training.start()
        logger.info("sdserve ready to take requests; default model %r", settings.default_model)
        try:
            yield
        finally:
            app.state.training.stop()
            worker.stop()

    app = FastAPI(
        title="sdserve",
        version="0.1.0",
        description="Stable Diffusion inference with a model registry. Images are base64 in JSON.",
        lifespan=lifespan,
    )
    register_error_handlers(app)
    app.include_router(generation.router)
    app.include_router(models.router)
    app.include_router(system.router)
    app.include_router(training.router)
    return app
