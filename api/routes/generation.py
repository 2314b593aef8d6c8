"""POST /text2img, /img2img, /inpainting: validate, queue, wait, encode.

They queue through the same JobService as POST /jobs, so they are recorded, cached and cancellable alike.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.deps import WorkerDep, get_jobs
from api.images import encode_images
from api.schemas import GenerationBody, GenerationResponse, Img2ImgBody, InpaintingBody, Task, Text2ImgBody
from models.engine import GenerationResult
from models.errors import JobCancelled
from models.jobs import JobOptions, JobService
from models.worker import GenerationWorker, Job

router = APIRouter(tags=["generation"])
DISCONNECT_POLL_S = 0.25


async def wait_for_job(job: Job, request: Request, worker: GenerationWorker) -> GenerationResult:
    """Wait for the worker; a client that goes away cancels its job instead of leaving it to run."""
    future = asyncio.wrap_future(job.future)
    while True:
        done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
        if done:
            return future.result()
        if await request.is_disconnected():
            worker.cancel(job.id)
            raise JobCancelled("the client disconnected")


def submit_body(jobs: JobService, body: GenerationBody, source: str) -> Job:
    """Queue a native body. Run it in a thread pool: it hashes input images and reads the registry."""
    options = JobOptions(
        save=body.save, explicit_seed=body.seed is not None, output_format=body.output_format, source=source
    )
    return jobs.submit(body.to_domain(), options, body=body)  # type: ignore[attr-defined]


async def execute(body: GenerationBody, request: Request, worker: GenerationWorker) -> tuple[Job, GenerationResult]:
    """Queue the body's job and wait for its result: the one path every API surface takes (so every surface
    is recorded, answered from the result cache when it can be, and cancelled when its client goes away)."""
    job = await run_in_threadpool(submit_body, get_jobs(request), body, request.url.path)
    return job, await wait_for_job(job, request, worker)


async def run_generation(
    body: GenerationBody, task: Task, request: Request, worker: GenerationWorker
) -> GenerationResponse:
    received = time.perf_counter()
    job, result = await execute(body, request, worker)
    encoding_started = time.perf_counter()
    images = await run_in_threadpool(encode_images, result.images, body.output_format)
    timings = dict(result.timings)
    timings["encoding_s"] = round(time.perf_counter() - encoding_started, 4)
    timings["total_s"] = round(time.perf_counter() - received, 4)
    return GenerationResponse.build(
        body, task, job.id, result, images, timings, cached=get_jobs(request).is_cached(job)
    )


@router.post("/text2img", response_model=GenerationResponse, summary="Generate images from a prompt")
@router.post("/text2img/", response_model=GenerationResponse, include_in_schema=False)
async def text2img(body: Text2ImgBody, request: Request, worker: WorkerDep) -> GenerationResponse:
    return await run_generation(body, "text2img", request, worker)


@router.post("/img2img", response_model=GenerationResponse, summary="Transform an input image with a prompt")
@router.post("/img2img/", response_model=GenerationResponse, include_in_schema=False)
async def img2img(body: Img2ImgBody, request: Request, worker: WorkerDep) -> GenerationResponse:
    return await run_generation(body, "img2img", request, worker)


@router.post("/inpainting", response_model=GenerationResponse, summary="Repaint the masked part of an image")
@router.post("/inpainting/", response_model=GenerationResponse, include_in_schema=False)
async def inpainting(body: InpaintingBody, request: Request, worker: WorkerDep) -> GenerationResponse:
    return await run_generation(body, "inpainting", request, worker)
