"""Request and response models of the training API (POST/GET/DELETE /train).

A request names the script (`kind`) and its `args`: the same options, with the same names and limits, as the
script's flags or config file (see `python -m training.train_lora --help`).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from models.types import JobStatus
from training.config import DreamBoothOptions, LoraOptions
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
    options: dict = Field(description="The options the script runs with, as the server completed them.")

    @classmethod
    def from_run(cls, run: TrainingRun, queue_position: int | None) -> TrainingRunInfo:
        last = run.progress()
        outcome = run.outcome() or {}
        return cls(
            id=run.id, kind=run.kind, state=run.state, queue_position=queue_position,
            created_at=_time(run.created_at), started_at=_time(run.started_at), finished_at=_time(run.finished_at),
            progress=TrainingProgress.model_validate(last) if last else None,
            register_as=run.register_as, registered_as=outcome.get("registered"), output=outcome.get("output"),
            exit_code=run.exit_code, error=run.error, options=run.options,
        )


class TrainingRunList(BaseModel):
    runs: list[TrainingRunInfo]


def _time(stamp: float | None) -> datetime | None:
    return datetime.fromtimestamp(stamp, tz=timezone.utc) if stamp is not None else None
