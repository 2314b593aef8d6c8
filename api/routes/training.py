"""Training runs over HTTP: start (202 + id), follow (state, progress lines, pictures), list, cancel, resume,
read the log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response, status
from fastapi.responses import FileResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from api.deps import TrainingDep
from api.training_schemas import TrainBody, TrainingEvents, TrainingRunInfo, TrainingRunList
from models.errors import TrainingRunNotFound

router = APIRouter(prefix="/train", tags=["training"])


@router.post("", response_model=TrainingRunInfo, status_code=status.HTTP_202_ACCEPTED,
             summary="Start a LoRA or DreamBooth-LoRA training run in the background")
async def start_run(body: TrainBody, manager: TrainingDep, response: Response) -> TrainingRunInfo:
    # Checking the dataset reads the disk: off the event loop.
    run = await run_in_threadpool(manager.submit, body.args)
    response.headers["Location"] = f"/train/{run.id}"
    return TrainingRunInfo.from_run(run, manager.queue_position(run))


@router.get("", response_model=TrainingRunList, summary="Training runs, oldest first")
async def list_runs(manager: TrainingDep) -> TrainingRunList:
    return TrainingRunList(runs=[TrainingRunInfo.from_run(run, manager.queue_position(run)) for run in manager.list()])


@router.get("/{run_id}", response_model=TrainingRunInfo, summary="State and last progress of a run")
async def show_run(run_id: str, manager: TrainingDep) -> TrainingRunInfo:
    run = manager.get(run_id)
    return TrainingRunInfo.from_run(run, manager.queue_position(run))


@router.delete("/{run_id}", response_model=TrainingRunInfo,
               summary="Cancel a run: a queued one at once, a running one after it checkpoints and exits")
async def cancel_run(run_id: str, manager: TrainingDep) -> TrainingRunInfo:
    run = await run_in_threadpool(manager.cancel, run_id)
    return TrainingRunInfo.from_run(run, manager.queue_position(run))


@router.get("/{run_id}/log", response_class=PlainTextResponse, summary="The end of a run's log")
async def run_log(run_id: str, manager: TrainingDep) -> str:
    return manager.get(run_id).log_tail(20_000)


@router.post("/{run_id}/resume", response_model=TrainingRunInfo, status_code=status.HTTP_202_ACCEPTED,
             summary="Queue a cancelled, interrupted or failed run again, from its last checkpoint")
async def resume_run(run_id: str, manager: TrainingDep) -> TrainingRunInfo:
    run = await run_in_threadpool(manager.resume, run_id)
    return TrainingRunInfo.from_run(run, manager.queue_position(run))


@router.get("/{run_id}/events", response_model=TrainingEvents,
            summary="A run's progress lines (steps with loss, validation images, ...) from a byte offset")
async def run_events(run_id: str, manager: TrainingDep,
                     offset: Annotated[int, Query(ge=0, description="The `offset` of the previous answer.")] = 0,
                     ) -> TrainingEvents:
    run = manager.get(run_id)
    return await run_in_threadpool(TrainingEvents.from_run, run, offset)


@router.get("/{run_id}/files/{path:path}", response_class=FileResponse,
            summary="A picture of the run: validation/<image>.png, loss.png, validation_grid.png")
async def run_file(run_id: str, path: str, manager: TrainingDep) -> FileResponse:
    file = manager.get(run_id).file(path)
    if file is None:
        raise TrainingRunNotFound(f"run {run_id} has no picture {path!r}")
    return FileResponse(file, media_type="image/png", headers={"Cache-Control": "no-cache"})
