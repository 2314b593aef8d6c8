"""Request and response models of the training API (POST/GET/DELETE /train, /train/{id}/..., /datasets).

A request names the script (`kind`) and its `args`: the same options, with the same names and limits, as the
script's flags or config file (see `python -m training.train_lora --help`), diffusers' spellings included.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field

from models.types import JobStatus
from training.config import DreamBoothOptions, LoraOptions
from training.datasets import DatasetInfo
from training.plots import LOSS_PLOT, VALIDATION_GRID
from training.runs import TrainingRun


class LoraTrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["lora"] = Field(description="Text-to-image LoRA from captioned images (training/train_lora.py).")
    args: LoraOptions = Field(description="Options of train_lora.py; dataset paths are relative to the datasets dir.")


class DreamBoothTrainBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["dreambooth"] = Field(description="DreamBooth-LoRA (training/train_dreambooth_lora.py).")
    args: DreamBoothOptions = Field(description="Options of train_dreambooth_lora.py.")


TrainBody = Annotated[LoraTrainBody | DreamBoothTrainBody, Field(discriminator="kind")]


class TrainingProgress(BaseModel):
    step: int = Field(description="Optimizer steps done.")
    max_steps: int
    epoch: int
    loss: float = Field(description="Loss of the last step, averaged over accumulation and processes.")
    lr: float
    steps_per_s: float
    size: list[int] | None = Field(None, description="Width and height of the last batch (its bucket).")


class TrainingRunInfo(BaseModel):
    id: str
    kind: str
    state: JobStatus
    queue_position: int | None = Field(None, description="1 = next to start; null unless queued.")
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: TrainingProgress | None = Field(None, description="The script's last progress line.")
    register_as: str | None = Field(None, description="Registry name the result will get.")
    registered_as: str | None = Field(None, description="Registry name it got, once done.")
    output: str | None = Field(None, description="The LoRA weights file, once done.")
    exit_code: int | None = None
    error: str | None = None
    resumes: int = Field(0, description="Times the run was resumed from a checkpoint.")
    resumable: bool = Field(False, description="Stopped after a checkpoint: POST /train/{id}/resume continues it.")
    links: dict[str, str] = Field(
        default_factory=dict,
        description="events (progress lines), log, and once written loss_plot and validation_grid (PNG files).",
    )
    options: dict = Field(description="The options the script runs with, as the server completed them.")

    @classmethod
    def from_run(cls, run: TrainingRun, queue_position: int | None) -> TrainingRunInfo:
        last = run.progress()
        outcome = run.outcome() or {}
        links = {"self": f"/train/{run.id}", "events": f"/train/{run.id}/events", "log": f"/train/{run.id}/log"}
        for name, file in (("loss_plot", LOSS_PLOT), ("validation_grid", VALIDATION_GRID)):
            if run.file(file) is not None:
                links[name] = file_url(run, file)
        return cls(
            id=run.id, kind=run.kind, state=run.state, queue_position=queue_position,
            created_at=_time(run.created_at), started_at=_time(run.started_at), finished_at=_time(run.finished_at),
            progress=TrainingProgress.model_validate(last) if last else None,
            register_as=run.register_as, registered_as=outcome.get("registered"), output=outcome.get("output"),
            exit_code=run.exit_code, error=run.error, resumes=run.resumes, resumable=run.resumable, links=links,
            options=run.options,
        )


class TrainingRunList(BaseModel):
    runs: list[TrainingRunInfo]


class TrainingEvents(BaseModel):
    """A run's progress lines from a byte offset: ask again with `offset` to get only the new ones."""

    events: list[dict[str, Any]] = Field(
        description="The script's progress lines (start, buckets, step, checkpoint, validation, stopped, done); "
        "validation events carry `urls` of their images."
    )
    offset: int = Field(description="Where to continue: GET /train/{id}/events?offset=...")
    state: JobStatus

    @classmethod
    def from_run(cls, run: TrainingRun, offset: int) -> TrainingEvents:
        events, next_offset = run.events_since(offset)
        folder = run.folder.resolve()
        for event in events:
            if event.get("event") == "validation":
                relative = [Path(path).resolve().relative_to(folder) for path in event.get("images", [])
                            if Path(path).resolve().is_relative_to(folder)]
                event["urls"] = [file_url(run, str(path)) for path in relative]
        return cls(events=events, offset=next_offset, state=run.state)


def file_url(run: TrainingRun, relative: str) -> str:
    return f"/train/{run.id}/files/{quote(relative)}"


# -- datasets ------------------------------------------------------------------------------------------------------
class DatasetDescription(BaseModel):
    name: str = Field(description="What POST /train's dataset (or instance_data_dir) names.")
    layout: Literal["metadata.jsonl", "captions", "images"] = Field(
        description="metadata.jsonl or same-name .txt captions (for kind lora), or images alone (for kind "
        "dreambooth's instance_data_dir)."
    )
    images: int
    captioned: int = Field(description="Images with a caption.")
    bytes: int
    created_at: datetime

    @classmethod
    def from_info(cls, info: DatasetInfo) -> DatasetDescription:
        return cls(name=info.name, layout=info.layout, images=info.images, captioned=info.captioned,
                   bytes=info.bytes, created_at=_time(info.created_at))


class DatasetList(BaseModel):
    datasets: list[DatasetDescription]


def _time(stamp: float | None) -> datetime | None:
    return datetime.fromtimestamp(stamp, tz=timezone.utc) if stamp is not None else None
