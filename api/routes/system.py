"""Health and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Response

from api.deps import EngineDep
from api.schemas import Health
from models.types import EngineState

router = APIRouter(tags=["system"])

_STATUS = {
    EngineState.starting: "loading",
    EngineState.loading: "loading",
    EngineState.ready: "ok",
    EngineState.failed: "degraded",
    EngineState.stopped: "stopped",
}


@router.get("/health", response_model=Health, summary="Ready when the default model is loaded",
            responses={503: {"model": Health, "description": "Loading, degraded (see `error`) or stopped"}})
async def health(response: Response, engine: EngineDep) -> Health:
    state = await engine.health()
    status = _STATUS[state.state]
    error = state.error
    if status == "ok" and state.default_model not in await engine.registry():
        # Removed from the file by hand (the API refuses to): requests without `model` would all be 404s.
        status, error = "degraded", f"the default model {state.default_model!r} is not in the registry"
    if status != "ok":
        response.status_code = 503
    return Health(
        status=status,  # type: ignore[arg-type]
        worker=state.state.value,
        default_model=state.default_model,
        loaded_models=list(state.loaded_models),
        queue_depth=state.queue_depth,
        device=state.device,
        schedulers=list(state.schedulers),
        error=error,
    )
