"""Health and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from api.deps import SettingsDep, WorkerDep
from api.schemas import Health
from models.schedulers import scheduler_names
from models.worker import WorkerState

router = APIRouter(tags=["system"])

_STATUS = {
    WorkerState.starting: "loading",
    WorkerState.loading: "loading",
    WorkerState.ready: "ok",
    WorkerState.failed: "degraded",
    WorkerState.stopped: "stopped",
}


@router.get("/health", response_model=Health, summary="Ready when the default model is loaded")
async def health(request: Request, response: Response, worker: WorkerDep, settings: SettingsDep) -> Health:
    state = _STATUS[worker.state]
    if state != "ok":
        response.status_code = 503
    return Health(
        status=state,  # type: ignore[arg-type]
        worker=worker.state.value,
        default_model=settings.default_model,
        loaded_models=worker.cache.loaded_names(),
        queue_depth=worker.queue_depth(),
        device=request.app.state.device.describe(),
        schedulers=scheduler_names(),
        error=worker.startup_error,
    )
