"""AUTOMATIC1111 API routes: translate in, generate, translate out (api/compat/a1111.py).

A request with n_iter > 1 runs as one job per iteration (batch_size images each), as A1111 runs them, so
/interrupt stops the running iteration with its image so far and runs no further one, and /skip moves on to the
next. Both act on jobs of A1111 clients only.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from api.compat import a1111
from api.compat.a1111 import (
    A1111State,
    ControlNetDetectBody,
    GenerationAnswer,
    Img2ImgRequest,
    PngInfoBody,
    Txt2ImgRequest,
)
from api.deps import EngineDep, SettingsDep
from api.schemas import GenerationBody
from api.security import check_may_cancel
from api.serving import BatchRun, cancel_on_disconnect, generate_in_batches
from models.errors import JobFinished
from models.interface import EngineClient

router = APIRouter(prefix="/sdapi/v1", tags=["compatibility: AUTOMATIC1111"])
controlnet_router = APIRouter(prefix="/controlnet", tags=["compatibility: AUTOMATIC1111"])
SOURCE_PREFIX = "/sdapi/"


def get_state(request: Request) -> A1111State:
    return request.app.state.a1111


StateDep = Annotated[A1111State, Depends(get_state)]


@router.post("/txt2img", response_model=GenerationAnswer)
@cancel_on_disconnect
async def txt2img(body: Txt2ImgRequest, request: Request, engine: EngineDep, state: StateDep) -> GenerationAnswer:
    native = await run_in_threadpool(a1111.txt2img_body, body, await engine.registry(), state)
    return await _run(engine, state, native, body, request.url.path)


@router.post("/img2img", response_model=GenerationAnswer)
@cancel_on_disconnect
async def img2img(body: Img2ImgRequest, request: Request, engine: EngineDep, state: StateDep) -> GenerationAnswer:
    native = await run_in_threadpool(a1111.img2img_body, body, await engine.registry(), state)
    return await _run(engine, state, native, body, request.url.path)


async def _run(engine: EngineClient, state: A1111State, native: GenerationBody, body: Txt2ImgRequest,
               source: str) -> GenerationAnswer:
    run = BatchRun(source)
    state.runs.append(run)
    try:
        jobs = await generate_in_batches(engine, native, source, body.batch_size, run)
    finally:
        state.runs.remove(run)
    images = await run_in_threadpool(a1111.encode_jobs, jobs)
    return a1111.generation_answer(body, jobs, images)


@router.get("/options")
async def get_options(engine: EngineDep, settings: SettingsDep, state: StateDep) -> dict[str, Any]:
    return a1111.options(state, await engine.registry(), settings.default_model)


@router.post("/options")
async def set_options(changes: dict[str, Any], engine: EngineDep, state: StateDep) -> None:
    a1111.set_options(state, await engine.registry(), changes)


@router.get("/progress")
async def progress(engine: EngineDep) -> dict[str, Any]:
    job = await engine.current_job()
    running = job if job is not None and job.status.value == "running" else None
    return a1111.progress(running, (await engine.health()).queue_depth)


@router.post("/interrupt")
async def interrupt(request: Request, engine: EngineDep, state: StateDep) -> dict[str, Any]:
    """The running A1111 job finishes now with its image so far (its request answers with it); the request's
    later iterations do not run."""
    job_id = await _stop_current(request, engine, state, whole_run=True)
    return {"interrupted": job_id}


@router.post("/skip")
async def skip(request: Request, engine: EngineDep, state: StateDep) -> dict[str, Any]:
    """The running A1111 iteration finishes now with its image so far; the request goes on with the next one."""
    return {"skipped": await _stop_current(request, engine, state, whole_run=False)}


async def _stop_current(request: Request, engine: EngineClient, state: A1111State, whole_run: bool) -> str | None:
    job = await engine.current_job()
    if job is None or not job.options.source.startswith(SOURCE_PREFIX):
        return None
    check_may_cancel(request, job)  # with API keys: the caller's own job, or an admin key
    run = state.run_of(job.id)
    if run is not None and whole_run:
        run.stopped = True
    with contextlib.suppress(JobFinished):  # it finished on its own meanwhile
        await engine.stop_early(job.id)
    return job.id


@router.get("/sd-models")
async def sd_models(engine: EngineDep) -> list[dict[str, Any]]:
    return a1111.sd_models(await engine.registry())


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(engine: EngineDep) -> None:
    await engine.reload_registry()


@router.get("/loras")
async def loras(engine: EngineDep) -> list[dict[str, Any]]:
    return a1111.loras(await engine.registry())


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return a1111.samplers()


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return a1111.schedulers()


@router.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    return a1111.upscalers()


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict[str, str]]:
    return a1111.latent_upscale_modes()


@router.post("/png-info")
async def png_info(body: PngInfoBody) -> dict[str, Any]:
    return a1111.png_info(body.image)


@router.get("/memory")
async def memory(engine: EngineDep) -> dict[str, Any]:
    return a1111.memory(await engine.system_stats())


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


# Things A1111 has and this server does not: empty, in A1111's shapes.
@router.get("/sd-vae")
async def sd_vae() -> list[dict[str, Any]]:
    return []


@router.get("/embeddings")
async def embeddings() -> dict[str, dict[str, Any]]:
    return {"loaded": {}, "skipped": {}}


@router.get("/prompt-styles")
async def prompt_styles() -> list[dict[str, Any]]:
    return []


@router.get("/hypernetworks")
async def hypernetworks() -> list[dict[str, Any]]:
    return []


@router.get("/face-restorers")
async def face_restorers() -> list[dict[str, Any]]:
    return []


# -- the sd-webui-controlnet extension's routes ----------------------------------------------------------------------
@controlnet_router.get("/version")
async def controlnet_version() -> dict[str, int]:
    return {"version": a1111.CONTROLNET_VERSION}


@controlnet_router.get("/model_list")
async def controlnet_model_list(engine: EngineDep) -> dict[str, list[str]]:
    loaded = [info.name for info in await engine.loaded_controlnets()]
    return a1111.controlnet_models(await engine.registry(), loaded)


@controlnet_router.get("/module_list")
async def controlnet_module_list() -> dict[str, Any]:
    return a1111.controlnet_modules()


@controlnet_router.post("/detect")
async def controlnet_detect(body: ControlNetDetectBody) -> dict[str, Any]:
    return await run_in_threadpool(a1111.controlnet_detect, body)
