"""The app factory: the lifespan builds the engine once and puts it on app.state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import register_error_handlers
from api.job_views import JobResults
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
from models.device import select_device
from models.jobs import JobService
from models.logcontext import configure_logging
from models.metrics import JobMetrics
from models.pipelines import PipelineCache
from models.registry import Registry
from models.settings import Settings, get_settings
from models.store import Store
from models.training_runs import TrainingRunManager
from models.worker import GenerationWorker

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry = Registry(settings.registry_path)
        device = select_device(settings)
        worker = GenerationWorker(settings, PipelineCache(settings, registry, device))
        worker.add_observer(JobMetrics())
        app.state.settings = settings
        app.state.registry = registry
        app.state.device = device
        app.state.worker = worker
        store = Store(settings.resolved_database_url())
        app.state.jobs = JobService(settings, worker, store, registry)
        app.state.job_results = JobResults(app.state.jobs, settings.output_dir)
        app.state.training = TrainingRunManager(settings, registry)
        worker.start()
        app.state.training.start()
        logger.info("sdserve ready to take requests; default model %r", settings.default_model)
        try:
            yield
        finally:
            app.state.training.stop()
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
    app.include_router(observability.router)
    app.include_router(training.router)
    mount_page(app)
    # Added last = outermost: the request id is set before metrics and everything else run.
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestIdMiddleware)
    return app
