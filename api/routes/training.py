"""Training runs over HTTP: start (202 + id), follow, list, cancel, read the log."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from api.deps import TrainingDep
from api.training_schemas import TrainBody, TrainingRunInfo, TrainingRunList

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
