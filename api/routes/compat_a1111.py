"""AUTOMATIC1111 API routes: translate in, generate, translate out (api/compat/a1111.py)."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, Request

from api.compat import a1111
from api.compat.a1111 import GenerationAnswer, Img2ImgRequest, Txt2ImgRequest
from api.deps import EngineDep, SettingsDep
from api.security import check_may_cancel
from api.serving import cancel_on_disconnect, generate
from models.errors import JobFinished

router = APIRouter(prefix="/sdapi/v1", tags=["compatibility: AUTOMATIC1111"])


@router.post("/txt2img", response_model=GenerationAnswer)
@cancel_on_disconnect
async def txt2img(body: Txt2ImgRequest, request: Request, engine: EngineDep) -> GenerationAnswer:
    native = a1111.txt2img_body(body, await engine.registry())
    return await a1111.generation_answer(body, await generate(engine, native, request.url.path))


@router.post("/img2img", response_model=GenerationAnswer)
@cancel_on_disconnect
async def img2img(body: Img2ImgRequest, request: Request, engine: EngineDep) -> GenerationAnswer:
    native = a1111.img2img_body(body, await engine.registry())
    return await a1111.generation_answer(body, await generate(engine, native, request.url.path))


@router.get("/sd-models")
async def sd_models(engine: EngineDep) -> list[dict[str, Any]]:
    return a1111.sd_models(await engine.registry())


@router.get("/loras")
async def loras(engine: EngineDep) -> list[dict[str, Any]]:
    return a1111.loras(await engine.registry())


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return a1111.samplers()


@router.get("/options")
async def options(settings: SettingsDep) -> dict[str, Any]:
    return {"sd_model_checkpoint": settings.default_model}


@router.get("/progress")
async def progress(engine: EngineDep) -> dict[str, Any]:
    job = await engine.current_job()
    running = job if job is not None and job.status.value == "running" else None
    return a1111.progress(running, (await engine.health()).queue_depth)


@router.post("/interrupt")
async def interrupt(request: Request, engine: EngineDep) -> dict[str, Any]:
    job = await engine.current_job()
    if job is not None:
        check_may_cancel(request, job)  # with API keys: the caller's own job, or an admin key
        with contextlib.suppress(JobFinished):  # it finished on its own meanwhile
            await engine.cancel(job.id)
    return {"interrupted": job.id if job else None}
