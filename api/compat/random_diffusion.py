"""Seed 001's random diffusion: a list of prompts, optionally models and input images; each output picks a
prompt and a model with a seeded generator, and the answer reports the results table of the seed (total time,
time per image, peak memory). Schemas, translate-in, translate-out, and the run that ties its jobs together.

A run is several native jobs, one per output, run one after another: each is queued, recorded (with its
parameters, in the image database), cancellable and followable like any job (GET /jobs/{id}/events). The run
itself lives in the API process (`RandomRuns`, the recent ones in memory): GET .../runs/{id} says which job runs
now and what each output picked.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from api.compat.shared import build_body
from api.images import Base64Image, encode_image
from api.schemas import GenerationBody, Img2ImgBody, Text2ImgBody
from models.errors import InvalidRequest, JobNotFound, SdserveError
from models.registry import BASE_KINDS, RegistryEntry
from models.types import MAX_SEED, JobSnapshot

ROUTE = "/api/image_model_domain/v1/random_diffusion/1"
MAX_OUTPUTS = 100
RUNS_KEPT = 50


class RandomDiffusionBody(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, populate_by_name=True)

    prompt_list: list[str] = Field(min_length=1, max_length=MAX_OUTPUTS, description="Prompts to pick from.")
    model_list: list[str] | None = Field(
        None, max_length=50, validation_alias=AliasChoices("model_list", "models"),
        description="Registry names of base models to pick from; default: every base in the registry.",
    )
    image_list: list[Base64Image] | None = Field(
        None, max_length=MAX_OUTPUTS, validation_alias=AliasChoices("image_list", "images"),
        description="Input images: one img2img output per image (its prompt and model picked at random).",
    )
    number_of_images: int | None = Field(
        None, ge=1, le=MAX_OUTPUTS, description="Outputs (text2img); default: one per prompt. With image_list: one "
        "per image.",
    )
    seed: int | None = Field(None, ge=-1, le=MAX_SEED, description="Seeds the picks and the images (output i uses "
                             "seed + i); default: drawn, and returned.")
    negative_prompt: str | None = None
    steps: int = Field(30, ge=1)
    cfg_scale: float = Field(7.0, ge=0, le=50)
    width: int | None = Field(None, ge=64, multiple_of=8)
    height: int | None = Field(None, ge=64, multiple_of=8)
    strength: float | None = Field(None, gt=0, le=1, description="img2img strength (0.75).")
    wait: bool = Field(True, description="Answer when every output is done (the seed's behaviour); false: 202 at "
                       "once with the run's id, to follow with GET .../runs/{id} and /jobs/{id}/events.")


class Output(BaseModel):
    index: int
    prompt: str = Field(description="The prompt this output picked.")
    model: str = Field(description="The model it picked.")
    input_image: int | None = Field(description="Index into image_list (img2img), or null (text2img).")
    seed: int
    job_id: str | None = Field(None, description="Its job: GET /jobs/{id}, /jobs/{id}/events.")
    status: str = "pending"
    time_s: float | None = Field(None, description="Seconds from queueing to the image.")
    image_ids: list[str] = Field(default_factory=list, description="Saved files: GET /images/{id}.")
    image: str | None = Field(None, description="The image, base64 PNG.")


class RandomDiffusionResult(BaseModel):
    run_id: str
    status: Literal["running", "succeeded", "failed", "cancelled"]
    seed: int
    number_of_images: int
    models_used: list[str]
    total_time_taken: float | None = Field(None, description="Seconds for the whole run (the seed's table).")
    average_time_per_image: float | None = Field(None, description="total_time_taken / number_of_images.")
    memory_usage_mb: float | None = Field(
        None, description="Peak memory: the device's on CUDA, the server process's resident peak elsewhere."
    )
    current_job: str | None = Field(None, description="The job running now; follow it at /jobs/{id}/events.")
    error: str | None = None
    outputs: list[Output]
    links: dict[str, str]


@dataclass
class Run:
    id: str
    seed: int
    outputs: list[Output]
    bodies: list[GenerationBody] = field(repr=False)
    status: str = "running"
    started: float = field(default_factory=time.perf_counter)
    total_s: float | None = None
    peak_mb: float | None = None
    error: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def result(self) -> RandomDiffusionResult:
        done = [output for output in self.outputs if output.status == "succeeded"]
        current = next((o.job_id for o in self.outputs if o.status == "running"), None)
        return RandomDiffusionResult(
            run_id=self.id, status=self.status, seed=self.seed, number_of_images=len(self.outputs),  # type: ignore[arg-type]
            models_used=sorted({output.model for output in self.outputs}), total_time_taken=self.total_s,
            average_time_per_image=round(self.total_s / len(done), 4) if self.total_s and done else None,
            memory_usage_mb=self.peak_mb, current_job=current, error=self.error, outputs=self.outputs,
            links={"self": f"{ROUTE}/runs/{self.id}"} | ({"events": f"/jobs/{current}/events"} if current else {}),
        )


class RandomRuns:
    """The recent runs of this process, by id."""

    def __init__(self, kept: int = RUNS_KEPT):
        self.kept = kept
        self._runs: OrderedDict[str, Run] = OrderedDict()

    def add(self, run: Run) -> None:
        self._runs[run.id] = run
        while len(self._runs) > self.kept:
            oldest = next(iter(self._runs.values()))
            if oldest.status == "running":
                break
            self._runs.popitem(last=False)

    def get(self, run_id: str) -> Run:
        if run_id not in self._runs:
            raise JobNotFound(f"no random diffusion run {run_id!r} (runs are kept in memory, the latest {self.kept})")
        return self._runs[run_id]


# -- translate in ---------------------------------------------------------------------------------------------------
def plan(body: RandomDiffusionBody, entries: dict[str, RegistryEntry]) -> Run:
    """Pick each output's prompt and model with a generator seeded by the run's seed, and build its native body."""
    bases = sorted(name for name, entry in entries.items() if entry.kind in BASE_KINDS)
    models = body.model_list or bases
    unknown = [name for name in models if name not in bases]
    if unknown:
        raise InvalidRequest(f"model_list: unknown base model(s) {', '.join(map(repr, unknown))}; registered: "
                             f"{', '.join(bases) or 'none'}")
    images = body.image_list or []
    count = len(images) if images else body.number_of_images or len(body.prompt_list)
    seed = random.randint(0, MAX_SEED - MAX_OUTPUTS) if body.seed in (None, -1) else body.seed
    picker = random.Random(seed)
    outputs, bodies = [], []
    for index in range(count):
        prompt, model = picker.choice(body.prompt_list), picker.choice(models)
        image_seed = (seed + index) % (MAX_SEED + 1)
        common: dict[str, Any] = {
            "prompt": prompt, "model": model, "seed": image_seed, "negative_prompt": body.negative_prompt,
            "steps": body.steps, "cfg_scale": body.cfg_scale, "width": body.width, "height": body.height,
            "save": True,
        }
        if images:
            bodies.append(build_body(Img2ImgBody, image=images[index], strength=body.strength, **common))
        else:
            bodies.append(build_body(Text2ImgBody, **common))
        outputs.append(Output(index=index, prompt=prompt, model=model, input_image=index if images else None,
                              seed=image_seed))
    return Run(id=uuid.uuid4().hex, seed=seed, outputs=outputs, bodies=bodies)


# -- translate out (as each job finishes) ---------------------------------------------------------------------------
def record(output: Output, job: JobSnapshot, image_ids: tuple[str, ...], seconds: float) -> float | None:
    """Fill an output from its finished job; returns the job's peak memory."""
    assert job.result is not None
    output.status, output.time_s, output.image_ids = "succeeded", round(seconds, 4), list(image_ids)
    output.image = encode_image(job.result.images[0], "png")
    return job.result.peak_memory_mb


def fail(run: Run, error: BaseException) -> None:
    run.status = "cancelled" if isinstance(error, asyncio.CancelledError) else "failed"
    run.error = str(error) if isinstance(error, SdserveError) else run.status
    for output in run.outputs:
        if output.status in ("pending", "running"):
            output.status = run.status
