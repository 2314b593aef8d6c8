"""Asynchronous jobs: submit (202), follow (state or Server-Sent Events), list, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.sse import EventSourceResponse, ServerSentEvent

from api.deps import AnswersDep, EngineDep
from api.job_schemas import JOB_ID_PATTERN, MAX_OFFSET, JobBody, JobCreated, JobInfo, JobLinks, JobList
from api.security import check_may_cancel
from api.serving import event_payload
from models.types import JobSnapshot, JobStatus

router = APIRouter(prefix="/jobs", tags=["jobs"])
CANCEL_WAIT_S = 2.0
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The id POST /jobs answered.")]


async def existing_job(job_id: JobId, engine: EngineDep) -> JobSnapshot:
    """The job without its result: an unknown id is a 404 before a stream starts."""
    return await engine.job(job_id, with_result=False)


ExistingJob = Annotated[JobSnapshot, Depends(existing_job)]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobCreated, summary="Queue a generation")
async def create_job(body: JobBody, response: Response, engine: EngineDep) -> JobCreated:
    """The body is a native generation body plus `task`. Answers at once; a full queue is 429 with Retry-After."""
    job = await engine.submit(body.to_domain(), body.options("/jobs"))
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobCreated(id=job.id, status=job.status, links=JobLinks.for_job(job.id))


@router.get("", response_model=JobList, summary="Recent jobs, newest first")
async def list_jobs(
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
) -> JobList:
    page = await engine.jobs(limit, offset, status_filter)
    return JobList(jobs=[JobInfo.from_snapshot(job) for job in page.items], total=page.total, limit=limit,
                   offset=offset)


@router.get("/{job_id}", response_model=JobInfo, summary="A job's state, and its result once succeeded")
async def get_job(job_id: JobId, engine: EngineDep, answers: AnswersDep) -> JobInfo:
    job = await engine.job(job_id)
    return JobInfo.from_snapshot(job, await answers.for_job(job))


@router.delete(
    "/{job_id}",
    response_model=JobInfo,
    summary="Cancel a job",
    responses={202: {"description": "Still running: it stops before its next step"}, 409: {"description": "Over"}},
)
async def cancel_job(job_id: JobId, request: Request, response: Response, engine: EngineDep) -> JobInfo:
    """A queued job is cancelled at once; a running one stops between two denoising steps (200 when that
    happened within a moment, else 202). A finished job cannot be cancelled (409). With API keys, only the key
    that submitted it or an admin key may cancel it (403)."""
    check_may_cancel(request, await engine.job(job_id, with_result=False))
    job = await engine.cancel(job_id, wait_s=CANCEL_WAIT_S)
    if not job.status.finished:
        response.status_code = status.HTTP_202_ACCEPTED
    return JobInfo.from_snapshot(job)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job: Server-Sent Events",
    description="Events, in order: `queued` {position} (again when the position changes), `started`, "
    "`progress` {step, total_steps, preview?: base64 JPEG every SDSERVE_PREVIEW_EVERY steps}, then exactly one "
    "of `done` {result}, `error` {detail} or `cancelled` {detail}, after which the stream ends. A client that "
    "connects late first gets the events that describe the current state. Every event carries job_id and status.",
)
async def job_events(job: ExistingJob, engine: EngineDep, answers: AnswersDep) -> AsyncIterable[ServerSentEvent]:
    async for event in engine.events(job.id):
        yield ServerSentEvent(event=event.kind, id=str(event.seq), data=await event_payload(event, engine, answers))
