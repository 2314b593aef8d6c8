"""The earlier servers' routes (seeds 000, 003, 004): translate in, generate, translate out (api/compat/seeds.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from api.compat import random_diffusion, seeds
from api.compat.random_diffusion import RandomDiffusionBody, RandomDiffusionResult, RandomRuns
from api.compat.seeds import (
    ActiveControlNets,
    ImagineBody,
    LoadControlNetCompatBody,
    LoadControlNetCompatResponse,
    LoadLoraCompatBody,
    LoadLoraCompatResponse,
    UnloadControlNetResponse,
)
from api.compat.shared import build_body, request_fields, upload_image
from api.controlnet_schemas import LoadedControlNet
from api.deps import EngineDep, SettingsDep
from api.lora_schemas import LoadedLora
from api.schemas import GenerationResponse, Text2ImgBody
from api.serving import answer_generation, cancel_on_disconnect, generate, generate_in_batches
from models.errors import SdserveError
from models.interface import EngineClient

router = APIRouter(tags=["compatibility: earlier servers"])


def get_runs(request: Request) -> RandomRuns:
    return request.app.state.random_runs


RunsDep = Annotated[RandomRuns, Depends(get_runs)]


@router.post("/submit", response_class=Response, summary="Seed 000's form: one PNG back")
@cancel_on_disconnect
async def submit(
    request: Request,
    engine: EngineDep,
    text_prompt: Annotated[str, Form()],
    manual_seed: Annotated[int, Form()],
    modelid: Annotated[str, Form()] = seeds.SEED_000_DEFAULT_MODEL,
    total_nm_img_prompt: Annotated[int, Form()] = 1,
    inference_steps: Annotated[int, Form()] = 30,
    guidance_scale: Annotated[float, Form()] = 7.5,
    negative_prompt: Annotated[str | None, Form()] = None,
    strength: Annotated[float, Form()] = 1.0,
    lora_hugging_face_1: Annotated[str | None, Form()] = None,
    weight_name_1: Annotated[str | None, Form()] = None,
    lora_hugging_face_2: Annotated[str | None, Form()] = None,
    weight_name_2: Annotated[str | None, Form()] = None,
    cross_attention_kwargs: Annotated[float | None, Form()] = 1.0,
) -> Response:
    form = {name: value for name, value in locals().items() if name not in ("request", "engine")}
    native = seeds.submit_body(await engine.registry(), form)
    return await seeds.png_answer(await generate(engine, native, request.url.path))


@router.post("/imagine", summary="Seed 004: a PNG stream (Accept: image/png) or a JSON array of base64 images")
@cancel_on_disconnect
async def imagine(body: ImagineBody, request: Request, engine: EngineDep) -> Any:
    # Each iteration its own batch, as optimizedSD runs them: n_samples x n_iter may exceed SDSERVE_MAX_IMAGES.
    jobs = await generate_in_batches(engine, body.to_native(), request.url.path, body.n_samples)
    return await seeds.imagine_answer(jobs, request.headers.get("accept", ""))


@router.post("/generate/", response_model=GenerationResponse, summary="Seed 002's README example: /text2img")
@router.post("/generate", response_model=GenerationResponse, include_in_schema=False)
@cancel_on_disconnect
async def generate_seed_002(body: Text2ImgBody, request: Request, engine: EngineDep) -> GenerationResponse:
    return await answer_generation(engine, body, request.url.path)


@router.post(f"{random_diffusion.ROUTE}/initialize_diffusion/", response_model=RandomDiffusionResult,
             summary="Seed 001: random prompts x random models, with the results table",
             responses={202: {"description": "wait: false: the run is queued; follow it at links.self"}})
@router.post(f"{random_diffusion.ROUTE}/initialize_diffusion", response_model=RandomDiffusionResult,
             include_in_schema=False)
@cancel_on_disconnect
async def initialize_diffusion(body: RandomDiffusionBody, request: Request, response: Response, engine: EngineDep,
                               runs: RunsDep) -> RandomDiffusionResult:
    run = random_diffusion.plan(body, await engine.registry())
    runs.add(run)
    run.task = asyncio.create_task(_execute(engine, run, request.url.path))
    run.task.add_done_callback(lambda task: task.cancelled() or task.exception())  # kept in run.error
    if not body.wait:
        response.status_code = 202
        response.headers["Location"] = f"{random_diffusion.ROUTE}/runs/{run.id}"
        return run.result()
    try:
        await asyncio.shield(run.task)
    except asyncio.CancelledError:
        run.task.cancel()  # the client went away: so does its run
        raise
    return run.result()


@router.get(f"{random_diffusion.ROUTE}/runs/{{run_id}}", response_model=RandomDiffusionResult,
            summary="Seed 001: a random diffusion run, its outputs so far and the job running now")
async def random_diffusion_run(run_id: str, runs: RunsDep) -> RandomDiffusionResult:
    return runs.get(run_id).result()


async def _execute(engine: EngineClient, run: random_diffusion.Run, source: str) -> None:
    """The run's jobs, one after another (each queued, recorded and followable as any job)."""
    try:
        for output, body in zip(run.outputs, run.bodies, strict=True):
            started = time.perf_counter()
            output.status = "running"
            job = await generate(engine, body, source, lambda job_id, output=output: setattr(output, "job_id", job_id))
            peak = random_diffusion.record(output, job, await engine.saved_image_ids(job.id),
                                           time.perf_counter() - started)
            run.peak_mb = max(filter(None, (run.peak_mb, peak)), default=None)
        run.status = "succeeded"
    except (SdserveError, asyncio.CancelledError) as error:
        random_diffusion.fail(run, error)
        raise  # to a waiting client as its error (status and detail); a run nobody waits for keeps it in `error`
    finally:
        run.total_s = round(time.perf_counter() - run.started, 4)


@router.post("/generate-image/", response_class=Response, summary="Seed 003's form: one PNG back")
@router.post("/generate-image", response_class=Response, include_in_schema=False)
@cancel_on_disconnect
async def generate_image(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    prompt: Annotated[str, Form()],
    height: Annotated[int | None, Form()] = None,  # None: the model's native size (seed 003 served SD 1.5: 512)
    width: Annotated[int | None, Form()] = None,
    num_inference_steps: Annotated[int, Form()] = 50,
    guidance_scale: Annotated[float, Form()] = 7.5,
    control_image: Annotated[UploadFile | None, File()] = None,
) -> Response:
    # Seed 003 loads LoRAs into its live pipeline with /load-lora/; they apply to every generation after that.
    preloaded = await engine.preloaded_lora_names(settings.default_model)
    image = controlnet = None
    if control_image is not None and control_image.filename:
        image = upload_image(await control_image.read(), "control_image")
        controlnet = await engine.latest_controlnet()
    native = await run_in_threadpool(seeds.generate_image_body, prompt, width, height, num_inference_steps,
                                     guidance_scale, preloaded, image, controlnet)
    return await seeds.png_answer(await generate(engine, native, request.url.path))


@router.post("/load-lora/", response_model=LoadLoraCompatResponse, summary="Seed 003: load a LoRA with a scale")
@router.post("/load-lora", response_model=LoadLoraCompatResponse, include_in_schema=False)
async def load_lora(request: Request, engine: EngineDep, settings: SettingsDep) -> LoadLoraCompatResponse:
    body = build_body(LoadLoraCompatBody, **await request_fields(request)).to_native()
    model = settings.default_model
    info = await engine.preload_lora(model, body.to_spec(), body.adapter_name, body.scale)
    return LoadLoraCompatResponse.from_loaded(LoadedLora.from_domain(model, info))


@router.post("/load-controlnet/", response_model=LoadControlNetCompatResponse,
             summary="Seed 003: load a ControlNet for /generate-image/'s control_image")
@router.post("/load-controlnet", response_model=LoadControlNetCompatResponse, include_in_schema=False)
async def load_controlnet(request: Request, engine: EngineDep, settings: SettingsDep) -> LoadControlNetCompatResponse:
    body = build_body(LoadControlNetCompatBody, **await request_fields(request))
    body.check_supported()
    # Checked against the default base, which /generate-image/ runs on: one that does not fit is refused now.
    info = await engine.preload_controlnet(body.controlnet_path, body.adapter_name, settings.default_model)
    loaded = LoadedControlNet.from_domain(info)
    return LoadControlNetCompatResponse(message=f"ControlNet {loaded.name!r} loaded from {loaded.source}",
                                        **loaded.model_dump())


@router.get("/active-controlnets/", response_model=ActiveControlNets, summary="Seed 003: the loaded ControlNets")
@router.get("/active-controlnets", response_model=ActiveControlNets, include_in_schema=False)
async def active_controlnets(engine: EngineDep) -> ActiveControlNets:
    infos = await engine.loaded_controlnets()
    return ActiveControlNets(active_controlnets=[info.name for info in infos],
                             controlnets=[LoadedControlNet.from_domain(info) for info in infos])


@router.delete("/unload-controlnet/", response_model=UnloadControlNetResponse, summary="Seed 003: unload a ControlNet")
@router.delete("/unload-controlnet", response_model=UnloadControlNetResponse, include_in_schema=False)
async def unload_controlnet(request: Request, engine: EngineDep) -> UnloadControlNetResponse:
    model_key = (await request_fields(request)).get("model_key")
    if not isinstance(model_key, str) or not model_key:
        raise RequestValidationError([{"loc": ("model_key",), "msg": "Field required", "type": "missing"}])
    await engine.unload_controlnet(model_key)
    return UnloadControlNetResponse(message=f"ControlNet {model_key!r} unloaded")
