"""Request and response models of the jobs and images API (POST /jobs, GET /jobs/..., GET /images/...)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from api.schemas import GenerationResponse, Img2ImgBody, InpaintingBody, Text2ImgBody
from models.types import ImageSnapshot, JobSnapshot, JobStatus, Task

# Paging past this is meaningless and would overflow the database's integers.
MAX_OFFSET = 1_000_000_000
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"


class Text2ImgJob(Text2ImgBody):
    task: Literal["text2img"] = Field(description="Which generation: the rest of the body is that route's body.")


class Img2ImgJob(Img2ImgBody):
    task: Literal["img2img"]


class InpaintingJob(InpaintingBody):
    task: Literal["inpainting"]


JobBody = Annotated[Text2ImgJob | Img2ImgJob | InpaintingJob, Field(discriminator="task")]


class JobLinks(BaseModel):
    self: str = Field(description="GET: the job's state; DELETE: cancel it.")
    events: str = Field(description="Server-Sent Events: queued, started, progress, then done, error or cancelled.")

    @classmethod
    def for_job(cls, job_id: str) -> JobLinks:
        return cls(self=f"/jobs/{job_id}", events=f"/jobs/{job_id}/events")


class JobCreated(BaseModel):
    id: str
    status: JobStatus
    links: JobLinks


class ImageLink(BaseModel):
    id: str
    url: str = Field(description="GET it for the PNG file.")


class JobInfo(BaseModel):
    id: str
    task: Task
    status: JobStatus
    queue_position: int | None = Field(
        None, description="0 while running, 1 for the next job to run, ...; null once finished."
    )
    step: int = Field(description="Denoising steps done so far.")
    total_steps: int = Field(description="Denoising steps in all (0 until the job starts).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None = Field(None, description="Why it failed, was cancelled or interrupted.")
    result: GenerationResponse | None = Field(
        None, description="Once succeeded (GET /jobs/{id} only): what the synchronous route would have answered."
    )
    model: str
    prompt: str
    cached: bool = Field(False, description="Answered from the result cache without running the model.")
    cancel_requested: bool = False
    images: list[ImageLink] = Field(default_factory=list, description="Saved image files, once written.")
    links: JobLinks

    @classmethod
    def from_snapshot(cls, job: JobSnapshot, result: GenerationResponse | None = None) -> JobInfo:
        return cls(
            id=job.id, task=job.task, status=job.status, queue_position=job.queue_position, step=job.step,
            total_steps=job.total_steps, created_at=_time(job.created_at), started_at=_time(job.started_at),
            finished_at=_time(job.finished_at), error=job.error, result=result, model=job.model, prompt=job.prompt,
            cached=job.cached, cancel_requested=job.cancel_requested,
            images=[ImageLink(id=image_id, url=image_url(image_id)) for image_id in job.image_ids],
            links=JobLinks.for_job(job.id),
        )


class JobList(BaseModel):
    jobs: list[JobInfo] = Field(description="Newest first; `result` is left out, GET /jobs/{id} has it.")
    total: int
    limit: int
    offset: int


class ImageInfo(BaseModel):
    id: str
    url: str
    job_id: str
    index: int = Field(description="Position in its job's batch.")
    model: str
    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    sha256: str = Field(description="Of the PNG file.")
    size_bytes: int
    file: str = Field(description="Path of the file inside the server's output folder.")
    parameters: str = Field(description="The AUTOMATIC1111 `parameters` text stored in the PNG.")
    created_at: datetime

    @classmethod
    def from_snapshot(cls, image: ImageSnapshot) -> ImageInfo:
        return cls(
            id=image.id, url=image_url(image.id), job_id=image.job_id, index=image.index, model=image.model,
            prompt=image.prompt, negative_prompt=image.negative_prompt, seed=image.seed, width=image.width,
            height=image.height, sha256=image.sha256, size_bytes=image.size_bytes, file=image.path,
            parameters=image.parameters_text, created_at=_time(image.created_at),
        )


class ImageList(BaseModel):
    images: list[ImageInfo] = Field(description="Newest first.")
    total: int
    limit: int
    offset: int


def image_url(image_id: str) -> str:
    return f"/images/{image_id}"


def _time(stamp: float | None) -> datetime | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, timezone.utc)
