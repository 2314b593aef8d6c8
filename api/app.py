"""The app factory: the lifespan builds the engine once and puts it on app.state."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import register_error_handlers
from api.job_views import JobResults
from api.routes import compat_a1111, compat_openai, compat_seeds, generation, images, jobs, loras, models, system
from models.device import select_device
from models.jobs import JobService
from models.pipelines import PipelineCache
from models.registry import Registry
from models.settings import Settings, get_settings
from models.store import Store
from models.worker import GenerationWorker

logger = logging.getLogger(__name__)


def configure_logging() -> None:
    """Our INFO lines (model loads, jobs) next to uvicorn's, unless the host process configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        level = os.environ.get("LOG_LEVEL", "info").upper()
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings.registry_path)
        device = select_device(settings)
        worker = GenerationWorker(settings, PipelineCache(settings, registry, device))
        app.state.settings = settings
        app.state.registry = registry
        app.state.device = device
        app.state.worker = worker
        store = Store(settings.resolved_database_url())
        app.state.jobs = JobService(settings, worker, store, registry)
        app.state.job_results = JobResults(app.state.jobs, settings.output_dir)
        worker.start()
        logger.info("sdserve ready to take requests; default model %r", settings.default_model)
        try:
            yield
        finally:
            worker.stop()
            app.state.jobs.close()  # after the worker: its last events (interrupted jobs) get written
            store.close()

    app = FastAPI(
        title="sdserve",
        version="0.1.0",
        description="Stable Diffusion inference with a model registry. Images are base64 in JSON.",
        lifespan=lifespan,
    )
    register_error_handlers(app)
    app.include_router(generation.router)
    app.include_router(jobs.router)
    app.include_router(images.router)
    app.include_router(models.router)
    app.include_router(system.router)
    app.include_router(loras.router)
    app.include_router(compat_seeds.router)
    app.include_router(compat_openai.router)
    app.include_router(compat_a1111.router)
    return app
