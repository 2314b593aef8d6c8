"""Jobs and images as the API shows them: live jobs from the worker, older ones from the database."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image
from starlette.concurrency import run_in_threadpool

from api.images import encode_images
from api.job_schemas import ImageInfo, ImageLink, JobInfo, JobLinks
from api.schemas import GenerationBody, GenerationResponse, Parameters
from models.engine import GenerationRequest, GenerationResult
from models.errors import ImageNotFound
from models.jobs import JobService
from models.store import ImageRecord, JobRecord, from_timestamp
from models.worker import Job, JobEvent

logger = logging.getLogger(__name__)

RECENT_RESULTS_KEPT = 16


def image_url(image_id: str) -> str:
    return f"/images/{image_id}"


def response_from_result(
    job_id: str, request: GenerationRequest, result: GenerationResult, images: list[str], output_format: str,
    cached: bool,
) -> GenerationResponse:
    return GenerationResponse.from_result(
        job_id, request.task, request.prompt, request.negative_prompt, output_format,  # type: ignore[arg-type]
        result, images, dict(result.timings), cached,
    )


class JobResults:
    """The encoded results of recent jobs, so a polling client and every event stream share one encoding."""

    def __init__(self, jobs: JobService, output_dir: Path, size: int = RECENT_RESULTS_KEPT):
        self.jobs = jobs
        self.output_dir = output_dir
        self.size = size
        self._responses: OrderedDict[str, GenerationResponse] = OrderedDict()

    async def for_job(self, job: Job) -> GenerationResponse | None:
        if job.result is None:
            return None
        if job.id in self._responses:
            return self._responses[job.id]
        service = self.jobs.context_of(job)
        images = await run_in_threadpool(encode_images, job.result.images, service.options.output_format)
        body = job.context.get("body")
        if isinstance(body, GenerationBody):  # the same builder as the synchronous answer
            response = GenerationResponse.build(body, job.request.task, job.id, job.result, images,
                                                dict(job.result.timings), cached=service.cached)
        else:
            response = response_from_result(job.id, job.request, job.result, images,
                                            service.options.output_format, service.cached)
        return self._keep(job.id, response)

    async def for_record(self, record: JobRecord) -> GenerationResponse | None:
        """Rebuilt from the saved files; None when the images were not saved (or were deleted)."""
        if record.status != "succeeded" or not record.seeds or len(record.images) != len(record.seeds):
            return None
        if record.id in self._responses:
            return self._responses[record.id]
        try:
            images = await run_in_threadpool(self._read_images, record.images, record.output_format)
        except (ImageNotFound, OSError) as error:
            logger.info("job %s: saved images unavailable: %s", record.id, error)
            return None
        parameters = Parameters(
            task=record.task,  # type: ignore[arg-type]
            prompt=record.prompt,
            negative_prompt=record.negative_prompt,
            width=record.width or 0,
            height=record.height or 0,
            steps=record.steps,
            cfg_scale=record.guidance_scale or 0.0,
            strength=record.strength,
            scheduler=record.scheduler or "",
            number_of_images=len(images),
            seed=record.seeds[0],
            output_format=record.output_format,  # type: ignore[arg-type]
        )
        response = GenerationResponse(images=images, seeds=record.seeds, model=record.model, parameters=parameters,
                                      timings=record.timings or {}, job_id=record.id, cached=record.cached)
        return self._keep(record.id, response)

    def _keep(self, job_id: str, response: GenerationResponse) -> GenerationResponse:
        self._responses[job_id] = response
        while len(self._responses) > self.size:
            self._responses.popitem(last=False)
        return response

    def _read_images(self, images: list[ImageRecord], output_format: str) -> list[str]:
        # Re-encoded from the pixels (not the file, which also carries metadata), so the answer is the same
        # bytes the job gave before the restart.
        pictures = []
        for record in images:
            with Image.open(image_path(self.output_dir, record)) as image:
                image.load()
                pictures.append(image.copy())
        return encode_images(pictures, output_format)  # type: ignore[arg-type]


def image_path(output_dir: Path, record: ImageRecord) -> Path:
    """The file of a recorded image, refusing anything that would lead outside the output folder."""
    root = output_dir.resolve()
    path = (root / record.path).resolve()
    if not path.is_relative_to(root):
        raise ImageNotFound(f"image {record.id}: its recorded path is outside the output folder")
    if not path.is_file():
        raise ImageNotFound(f"image {record.id}: the file {record.path} is no longer in the output folder")
    return path


async def live_job_info(job: Job, jobs: JobService, results: JobResults, with_result: bool = True) -> JobInfo:
    service = jobs.context_of(job)
    result = await results.for_job(job) if with_result else None
    return JobInfo(
        id=job.id,
        task=job.request.task,
        status=job.state.value,  # type: ignore[arg-type]
        queue_position=jobs.worker.queue_position(job),
        step=job.step,
        total_steps=job.total_steps,
        created_at=from_timestamp(job.created_at),  # type: ignore[arg-type]
        started_at=from_timestamp(job.started_at),
        finished_at=from_timestamp(job.finished_at),
        error=job.error,
        result=result,
        model=job.result.model if job.result else service.model,
        prompt=job.request.prompt,
        cached=service.cached,
        cancel_requested=job.cancel_requested.is_set() and not job.done,
        images=[ImageLink(id=image_id, url=image_url(image_id)) for image_id in service.saved],
        links=JobLinks.for_job(job.id),
    )


async def record_job_info(record: JobRecord, results: JobResults, with_result: bool = True) -> JobInfo:
    return JobInfo(
        id=record.id,
        task=record.task,  # type: ignore[arg-type]
        status=record.status,  # type: ignore[arg-type]
        queue_position=None,
        step=record.step,
        total_steps=record.total_steps,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        error=record.error,
        result=await results.for_record(record) if with_result else None,
        model=record.model,
        prompt=record.prompt,
        cached=record.cached,
        images=[ImageLink(id=image.id, url=image_url(image.id)) for image in record.images],
        links=JobLinks.for_job(record.id),
    )


def image_info(record: ImageRecord) -> ImageInfo:
    return ImageInfo(
        id=record.id,
        url=image_url(record.id),
        job_id=record.job_id,
        index=record.index,
        model=record.model,
        prompt=record.prompt,
        negative_prompt=record.negative_prompt,
        seed=record.seed,
        width=record.width,
        height=record.height,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        file=record.path,
        parameters=record.parameters_text,
        created_at=record.created_at,
    )


async def event_payload(event: JobEvent, job: Job, results: JobResults) -> dict[str, Any]:
    """The JSON an event stream sends: the event's fields, images base64, a finished job's full result."""
    payload: dict[str, Any] = {"job_id": event.job_id}
    for name, value in event.data.items():
        if name == "result":
            payload["result"] = (await results.for_job(job)).model_dump(mode="json")  # type: ignore[union-attr]
        elif isinstance(value, bytes):
            payload[name] = base64.b64encode(value).decode("ascii")
        else:
            payload[name] = value
    return payload


async def record_event(record: JobRecord, results: JobResults) -> tuple[str, dict[str, Any]]:
    """The one event that describes a job known only from the database (finished, or interrupted)."""
    payload: dict[str, Any] = {"job_id": record.id, "status": record.status}
    if record.status == "succeeded":
        response = await results.for_record(record)
        payload["result"] = response.model_dump(mode="json") if response else None
        return "done", payload
    if record.status == "cancelled":
        return "cancelled", payload | {"detail": record.error or "cancelled"}
    return "error", payload | {"detail": record.error or record.status}


async def wait_until_done(job: Job, timeout_s: float, poll_s: float = 0.05) -> bool:
    """Poll (never wrap the job's future: cancelling that wrapper would cancel the future for its other waiters)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not job.done and loop.time() < deadline:
        await asyncio.sleep(poll_s)
    return job.done
