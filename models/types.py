"""The vocabulary that crosses the engine interface: what a client asks for, and the snapshots it gets back.

Everything here is plain data (frozen dataclasses, enums, PIL images): it can be copied to another thread or
pickled to another process, so a remote engine can stand behind the same interface as the in-process one.
Nothing here refers to a live pipeline, queue or database session.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from PIL import Image

Task = Literal["text2img", "img2img", "inpainting"]
TASK_NAMES: tuple[Task, ...] = ("text2img", "img2img", "inpainting")
MAX_SEED = 2**32 - 1
SeedOrigin = Literal["client", "drawn"]


class JobStatus(str, Enum):
    """Where a generation job (or a training run) stands. The last four are final."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    interrupted = "interrupted"  # the server stopped before it finished

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.queued, JobStatus.running)


UNFINISHED_STATUSES = (JobStatus.queued, JobStatus.running)


class EngineState(str, Enum):
    starting = "starting"
    loading = "loading"
    ready = "ready"
    failed = "failed"
    stopped = "stopped"


# -- what a client asks for -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraSpec:
    """One LoRA a request asks for. `scale` None means the registry's (or preload's) default, else 1.0."""

    name: str
    weight_name: str | None = None
    scale: float | None = None


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet for one generation and its conditioning image (edges, depth, pose, ...).

    It steers the steps from `guidance_start` to `guidance_end` (fractions of the run). `guess_mode` runs it on the
    conditional half of classifier-free guidance only, its residuals scaled down towards the shallow blocks
    (diffusers' guess mode; the A1111 extension's "ControlNet is more important")."""

    name: str
    image: Image.Image = field(repr=False)
    scale: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False


HiresUpscaler = Literal["latent", "latent-antialiased", "latent-bicubic", "latent-bicubic-antialiased",
                        "latent-nearest", "latent-nearest-exact", "lanczos", "nearest"]
HIRES_UPSCALERS: tuple[HiresUpscaler, ...] = ("latent", "latent-antialiased", "latent-bicubic",
                                              "latent-bicubic-antialiased", "latent-nearest", "latent-nearest-exact",
                                              "lanczos", "nearest")


@dataclass(frozen=True)
class HiresFix:
    """A second pass at a larger size (A1111's "hires fix"): the first pass at the request's size, an upscale of
    its latents (`latent`: bilinear; bicubic, nearest, antialiased variants) or of its image (`lanczos`, `nearest`)
    to width x height,
    then img2img at that size with `strength` over `steps` steps (None: the request's steps)."""

    width: int
    height: int
    upscaler: HiresUpscaler = "latent"
    steps: int | None = None
    strength: float = 0.7


@dataclass(frozen=True)
class GenerationRequest:
    """One generation in domain terms. `seed` None asks the engine to draw one (the job records which it was)."""

    task: Task
    prompt: str
    negative_prompt: str | None = None
    model: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance_scale: float | None = None  # None: the model family's default (models/families.py)
    num_images: int = 1
    seed: int | None = None
    strength: float | None = None
    scheduler: str | None = None
    image: Image.Image | None = field(default=None, repr=False)
    mask_image: Image.Image | None = field(default=None, repr=False)
    loras: tuple[LoraSpec, ...] = ()
    controlnets: tuple[ControlNetSpec, ...] = ()  # several: diffusers' multi-ControlNet, one image each
    hires: HiresFix | None = None
    # What only some model families take (models/families.py says which); None: not given.
    prompt_2: str | None = None  # the second text encoder's prompt (SDXL, SD 3.x: CLIP-G; FLUX: T5)
    negative_prompt_2: str | None = None
    prompt_3: str | None = None  # SD 3.x: the T5 encoder's prompt
    negative_prompt_3: str | None = None
    original_size: tuple[int, int] | None = None  # SDXL size conditioning, (height, width) as diffusers orders it
    target_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None  # (top, left)
    guidance: float | None = None  # FLUX's distilled guidance
    refiner: str | None = None  # SDXL: a registry name of a refiner that runs the last steps
    refiner_switch_at: float | None = None  # the fraction of the steps the base runs before the refiner

    @property
    def controlnet(self) -> ControlNetSpec | None:
        """The first ControlNet (most requests have at most one)."""
        return self.controlnets[0] if self.controlnets else None


@dataclass(frozen=True)
class JobOptions:
    """How a job is handled around the generation itself."""

    save: bool | None = None  # save the images as PNG files; None: SDSERVE_SAVE_IMAGES
    output_format: str = "png"  # how the client wants its images encoded (saved files are always PNG)
    source: str = "jobs"  # the route that submitted it
    owner: str | None = None  # the API key (its fingerprint) that submitted it, when keys are configured


# -- what ran -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ActiveLora:
    """A LoRA as one generation used it: the resolved scale, the trigger words it added, the file's identity."""

    name: str
    adapter_name: str
    scale: float
    trigger_words: tuple[str, ...] = ()
    weight_name: str | None = None
    sha256: str | None = None  # the registry's, when the LoRA is a registry entry


@dataclass(frozen=True)
class ControlNetUse:
    name: str
    scale: float
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False


@dataclass(frozen=True)
class GenerationResult:
    """What a finished generation made and exactly how: the one record every answer, file and row comes from."""

    images: list[Image.Image] = field(repr=False)
    seeds: list[int]
    model: str
    prompt: str  # as the pipeline received it: the request's prompt with the LoRAs' trigger words
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float | None
    scheduler: str  # the request's scheduler name, else the model's own scheduler class
    scheduler_name: str | None  # the request's scheduler name (None: the model's own), to ask for it again
    loras: tuple[ActiveLora, ...] = ()
    controlnets: tuple[ControlNetUse, ...] = ()
    model_sha256: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    hires: HiresFix | None = None  # width and height above are the final (upscaled) size
    first_pass_size: tuple[int, int] | None = None  # with hires: the size of the first pass
    stopped_at_step: int | None = None  # asked to finish early (A1111's interrupt): the image of this step
    peak_memory_mb: float | None = None  # device memory (CUDA) or the process's resident peak (CPU)
    family: str | None = None  # the model's family (sd, sdxl, sdxl-refiner, sd3, flux)
    # The family arguments it ran with (GenerationRequest names: prompt_2, original_size, refiner, ...), with the
    # refiner's switch point resolved; only those given.
    family_arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def controlnet(self) -> ControlNetUse | None:
        return self.controlnets[0] if self.controlnets else None


# -- jobs as a client sees them -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobSnapshot:
    """A job at one moment, live or from the database. `result` is set once it succeeded (when asked for and,
    for a recorded job, while its image files exist)."""

    id: str
    task: Task
    status: JobStatus
    prompt: str  # as asked
    negative_prompt: str | None
    model: str
    options: JobOptions
    seed_origin: SeedOrigin
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    queue_position: int | None = None  # 0 while running, 1 for the next one; None once finished
    step: int = 0
    total_steps: int = 0
    error: str | None = None
    cached: bool = False  # answered from the result cache
    cancel_requested: bool = False
    image_ids: tuple[str, ...] = ()  # saved image files, once written
    result: GenerationResult | None = None


EventKind = Literal["queued", "started", "progress", "done", "error", "cancelled"]
TERMINAL_EVENTS: frozenset[str] = frozenset({"done", "error", "cancelled"})


@dataclass(frozen=True)
class JobEvent:
    """One change of a job: queued {position}, started, progress {step, total_steps, preview?}, then exactly one of
    done, error {detail} or cancelled {detail}."""

    job_id: str
    kind: EventKind
    seq: int
    status: JobStatus
    at: float
    position: int | None = None
    step: int | None = None
    total_steps: int | None = None
    preview: bytes | None = field(default=None, repr=False)  # a small JPEG of the latents
    detail: str | None = None

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_EVENTS


@dataclass(frozen=True)
class Page:
    """One page of a listing, and how many there are in all."""

    items: list[Any]
    total: int


@dataclass(frozen=True)
class ImageSnapshot:
    """A saved image file and the parameters it was made with."""

    id: str
    job_id: str
    index: int
    model: str
    prompt: str
    negative_prompt: str | None
    seed: int
    width: int
    height: int
    sha256: str
    size_bytes: int
    path: str  # relative to the output folder
    parameters_text: str
    created_at: float


# -- adapters, pipelines, the engine's state ------------------------------------------------------------------------
@dataclass(frozen=True)
class LoraInfo:
    """A loaded LoRA adapter."""

    adapter_name: str
    reference: str
    file: str
    scale: float
    trigger_words: tuple[str, ...]
    preloaded: bool
    loaded_at: float
    uses: int


@dataclass(frozen=True)
class ControlNetInfo:
    """A loaded ControlNet."""

    name: str
    source: str
    preloaded: bool
    loaded_at: float
    uses: int


@dataclass(frozen=True)
class PipelineInfo:
    task: str
    pipeline_class: str
    scheduler: str


@dataclass(frozen=True)
class ModelState:
    """A loaded base model: its task pipelines, its LoRAs and the adapters the last request ran with."""

    name: str
    pipelines: tuple[PipelineInfo, ...]
    weight_bytes: int
    loaded_at: float
    loras: tuple[LoraInfo, ...] = ()
    applied_loras: tuple[tuple[str, float], ...] = ()
    applied_controlnets: tuple[str, ...] = ()  # the ControlNets the last request on this model ran with


@dataclass(frozen=True)
class EngineHealth:
    state: EngineState
    default_model: str
    loaded_models: tuple[str, ...]
    queue_depth: int
    queue_capacity: int
    device: dict[str, str]
    schedulers: tuple[str, ...]
    error: str | None = None
