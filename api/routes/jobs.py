"""Asynchronous jobs: submit (202), follow (state or Server-Sent Events), list, cancel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response, status
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.deps import JobResultsDep, JobsDep
from api.job_schemas import JOB_ID_PATTERN, JobBody, JobCreated, JobInfo, JobLinks, JobList, JobStatus
from api.job_views import event_payload, live_job_info, record_event, record_job_info, wait_until_done
from api.routes.generation import submit_body
from models.errors import JobFinished, JobNotFound
from models.store import JobRecord
from models.worker import Job, JobEvent

router = APIRouter(prefix="/jobs", tags=["jobs"])
CANCEL_WAIT_S = 2.0
JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The id POST /jobs answered.")]


async def find_job(job_id: JobId, jobs: JobsDep) -> Job | JobRecord:
    """The live job if the worker still has it, else its database record."""
    job = jobs.live(job_id)
    if job is not None:
        return job
    record = await run_in_threadpool(jobs.record, job_id)
    if record is None:
        raise JobNotFound(job_id)
    return record


FoundJob = Annotated[Job | JobRecord, Depends(find_job)]


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobCreated, summary="Queue a generation")
async def create_job(body: JobBody, response: Response, jobs: JobsDep) -> JobCreated:
    """The body is a native generation body plus `task`. Answers at once; a full queue is 429 with Retry-After."""
    job = await run_in_threadpool(submit_body, jobs, body, "/jobs")
    response.headers["Location"] = f"/jobs/{job.id}"
    return JobCreated(id=job.id, status=job.state.value, links=JobLinks.for_job(job.id))  # type: ignore[arg-type]


@router.get("", response_model=JobList, summary="Recent jobs, newest first")
async def list_jobs(
    jobs: JobsDep,
    results: JobResultsDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
) -> JobList:
    records, total = await run_in_threadpool(jobs.store.list_jobs, limit, offset, status_filter)
    infos = []
    for record in records:
        live = jobs.live(record.id)
        if live is not None and not live.done:  # the database has no per-step progress
            infos.append(await live_job_info(live, jobs, results, with_result=False))
        else:
            infos.append(await record_job_info(record, results, with_result=False))
    return JobList(jobs=infos, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobInfo, summary="A job's state, and its result once succeeded")
async def get_job(job: FoundJob, jobs: JobsDep, results: JobResultsDep) -> JobInfo:
    if isinstance(job, Job):
        return await live_job_info(job, jobs, results)
    return await record_job_info(job, results)


@router.delete(
    "/{job_id}",
    response_model=JobInfo,
    summary="Cancel a job",
    responses={202: {"description": "Still running: it stops before its next step"}, 409: {"description": "Over"}},
)
async def cancel_job(job: FoundJob, response: Response, jobs: JobsDep, results: JobResultsDep) -> JobInfo:
    """A queued job is cancelled at once; a running one stops between two denoising steps (200 when that
    happened within a moment, else 202). A finished job cannot be cancelled (409)."""
    if isinstance(job, JobRecord) or job.done:
        state = job.status if isinstance(job, JobRecord) else job.state.value
        raise JobFinished(f"job {job.id} is already {state}; nothing to cancel")
    jobs.worker.cancel(job.id)
    if not await wait_until_done(job, CANCEL_WAIT_S):
        response.status_code = status.HTTP_202_ACCEPTED
    return await live_job_info(job, jobs, results)


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job: Server-Sent Events",
    description="Events, in order: `queued` {position} (again when the position changes), `started`, "
    "`progress` {step, total_steps, preview?: base64 JPEG every SDSERVE_PREVIEW_EVERY steps}, then exactly one "
    "of `done` {result}, `error` {detail} or `cancelled` {detail}, after which the stream ends. A client that "
    "connects late first gets the events that describe the current state. Every event carries job_id and status.",
)
async def job_events(job: FoundJob, jobs: JobsDep, results: JobResultsDep) -> AsyncIterable[ServerSentEvent]:
    if isinstance(job, JobRecord):
        kind, payload = await record_event(job, results)
        yield ServerSentEvent(event=kind, data=payload)
        return
    async for event in _follow(job):
        yield ServerSentEvent(event=event.kind, id=str(event.seq), data=await event_payload(event, job, results))


async def _follow(job: Job) -> AsyncIterable[JobEvent]:
    """The job's events on this event loop: the replay of its current state, then each new one, to the end."""
    loop = asyncio.get_running_loop()
    incoming: asyncio.Queue[JobEvent] = asyncio.Queue()

    def listener(event: JobEvent) -> None:  # on the worker's (or a canceller's) thread
        with contextlib.suppress(RuntimeError):  # the loop has closed: this client is long gone
            loop.call_soon_threadsafe(incoming.put_nowait, event)

    replay = job.subscribe(listener)
    try:
        for event in replay:
            yield event
        if replay and replay[-1].terminal:
            return
        while True:
            event = await incoming.get()
            yield event
            if event.terminal:
                return
    finally:
        job.unsubscribe(listener)

