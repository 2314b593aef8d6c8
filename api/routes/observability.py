"""System usage (GET /stats, seed 003's shape) and Prometheus metrics (GET /metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from api.deps import EngineDep
from api.system_schemas import Stats

router = APIRouter(tags=["system"])


@router.get("/stats", response_model=Stats, summary="CPU RAM and per-GPU load and memory")
async def stats(engine: EngineDep) -> Stats:
    return Stats.model_validate(await engine.system_stats())


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text exposition format"}},
)
def prometheus_metrics() -> Response:
    # Plain `def`: the queue gauges call into the worker (a lock) while rendering.
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
