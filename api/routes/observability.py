"""System usage (GET /stats, seed 003's shape) and Prometheus metrics (GET /metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from api.deps import SettingsDep, WorkerDep
from api.system_schemas import Stats
from models import metrics
from models.system_stats import system_stats

router = APIRouter(tags=["system"])


# Plain `def`: psutil and NVML calls are quick but blocking, so they run in the thread pool.
@router.get("/stats", response_model=Stats, summary="CPU RAM and per-GPU load and memory")
def stats() -> Stats:
    return Stats.model_validate(system_stats())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition format"}},
)
def prometheus_metrics(worker: WorkerDep, settings: SettingsDep) -> Response:
    metrics.queue_state(depth=worker.queue_depth(), capacity=settings.queue_size)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
