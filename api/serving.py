"""The generation path every API surface takes, and how finished jobs become answers.

Native routes, compatibility routes and the page all queue through `generate` (so every surface is recorded,
answered from the result cache when it can be, and cancelled when its client goes away) and build answers with
`Answers`, which encodes each finished job's images once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from api.images import encode_images
from api.schemas import GenerationBody, GenerationResponse
from models.errors import JobCancelled, SdserveError
from models.interface import EngineClient
from models.types import JobEvent, JobSnapshot

P = ParamSpec("P")
R = TypeVar("R")
ANSWERS_KEPT = 16


async def generate(
    engine: EngineClient, body: GenerationBody, source: str, on_submitted: Callable[[str], None] | None = None
) -> JobSnapshot:
    """Queue a native body and wait for its result (the job's error is raised as is). When the waiting request is
    cancelled (its client went away, see `cancel_on_disconnect`), the job is cancelled too. `on_submitted` hears
    the job's id as soon as it is queued."""
    job = await engine.submit(body.to_domain(), body.options(source))
    if on_submitted is not None:
        on_submitted(job.id)
    try:
        return await engine.wait(job.id)
    except asyncio.CancelledError:
        with contextlib.suppress(SdserveError):  # it may have finished meanwhile
            await engine.cancel(job.id)
        raise


@dataclass
class BatchRun:
    """A request that runs as several jobs one after another: the job running now, and whether to stop before
    the next one (A1111's interrupt)."""

    source: str
    job_id: str | None = None
    stopped: bool = False
    job_ids: list[str] = field(default_factory=list)

    def submitted(self, job_id: str) -> None:
        self.job_id = job_id
        self.job_ids.append(job_id)


async def generate_in_batches(
    engine: EngineClient, body: GenerationBody, source: str, batch_size: int, run: BatchRun | None = None
) -> list[JobSnapshot]:
    """`body.number_of_images` images as jobs of at most `batch_size` each, one after another, with the seeds one
    job of them all would use (seed + i; the seed the first job drew when none was given). Stops early when
    `run.stopped` is set; at least the first job runs."""
    run = run or BatchRun(source)
    jobs: list[JobSnapshot] = []
    total, seed = body.number_of_images, body.seed
    while sum(len(job.result.seeds) for job in jobs if job.result) < total and not (jobs and run.stopped):
        done = sum(len(job.result.seeds) for job in jobs if job.result)
        batch = body.model_copy(update={"number_of_images": min(batch_size, total - done),
                                        "seed": None if seed is None else seed + done})
        job = await generate(engine, batch, source, run.submitted)
        assert job.result is not None
        if seed is None:
            seed = job.result.seeds[0]
        jobs.append(job)
    return jobs


def cancel_on_disconnect(handler: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Run a route handler until it returns or its client disconnects; then cancel it (and with it, through
    `generate`, the job it waits for). The handler needs a `request: Request` parameter, and its body must be
    parsed by FastAPI (a handler that reads the body itself would race this listener for it)."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        request = kwargs["request"]
        assert isinstance(request, Request)
        handling = asyncio.ensure_future(handler(*args, **kwargs))
        disconnect = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({handling, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        if handling in done:
            disconnect.cancel()
            return handling.result()
        handling.cancel()
        await asyncio.gather(handling, return_exceptions=True)
        raise JobCancelled("the client disconnected")

    return wrapper


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Answers:
    """The encoded answers of recent jobs, so a polling client and every event stream share one encoding."""

    def __init__(self, size: int = ANSWERS_KEPT):
        self.size = size
        self._answers: OrderedDict[str, GenerationResponse] = OrderedDict()

    async def for_job(self, job: JobSnapshot, timings: dict[str, float] | None = None) -> GenerationResponse | None:
        """The answer of a finished job; None when it has no result (not succeeded, or its files are gone)."""
        if job.result is None:
            return None
        if job.id in self._answers:
            return self._answers[job.id]
        images = await run_in_threadpool(encode_images, job.result.images, job.options.output_format)
        answer = GenerationResponse.from_snapshot(job, images, timings or dict(job.result.timings))
        self._answers[job.id] = answer
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)
        return answer


async def answer_generation(engine: EngineClient, body: GenerationBody, source: str) -> GenerationResponse:
    """A synchronous native route: generate, then the answer with encoding and total times added."""
    received = time.perf_counter()
    job = await generate(engine, body, source)
    assert job.result is not None
    encoding_started = time.perf_counter()
    images = await run_in_threadpool(encode_images, job.result.images, body.output_format)
    timings = dict(job.result.timings)
    timings["encoding_s"] = round(time.perf_counter() - encoding_started, 4)
    timings["total_s"] = round(time.perf_counter() - received, 4)
    return GenerationResponse.from_snapshot(job, images, timings)


async def event_payload(event: JobEvent, engine: EngineClient, answers: Answers) -> dict[str, Any]:
    """The JSON an event stream sends: the event's fields, a preview as base64 JPEG, a finished job's answer."""
    payload: dict[str, Any] = {"job_id": event.job_id, "status": event.status.value}
    for name in ("position", "step", "total_steps", "detail"):
        value = getattr(event, name)
        if value is not None:
            payload[name] = value
    if event.preview is not None:
        payload["preview"] = base64.b64encode(event.preview).decode("ascii")
    if event.kind == "done":
        answer = await answers.for_job(await engine.job(event.job_id))
        payload["result"] = answer.model_dump(mode="json") if answer else None
    return payload
