"""Request and response models of the native API. Field names follow seed 002 (prompt, cfg_scale, steps,
number_of_images, seed, width, height, image, mask_image); common aliases from other servers are accepted."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from api.controlnet_schemas import ControlNetBody, ControlNetUsed
from api.images import Base64Image, OutputFormat
from api.security import current_owner
from models.errors import InvalidRequest
from models.registry import FamilyName, ModelKind, RegistryEntry
from models.sources import NAME_PATTERN
from models.types import (
    MAX_SEED,
    ActiveLora,
    GenerationRequest,
    HiresFix,
    HiresUpscaler,
    JobOptions,
    JobSnapshot,
    LoraSpec,
    Task,
)


class LoraBody(BaseModel):
    """One LoRA for a generation request; a bare string is taken as its name."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(
        min_length=1, max_length=1000, validation_alias=AliasChoices("name", "path", "lora"),
        description="A registry entry of kind lora, a preloaded adapter name, a local .safetensors file or folder "
        "inside the allowed folders (SDSERVE_LORA_ROOTS), or a Hugging Face repo id in the local HF cache.",
    )
    weight_name: str | None = Field(
        None, min_length=1, max_length=255,
        description="The file inside a folder or repo, when it is not pytorch_lora_weights.safetensors.",
    )
    scale: float | None = Field(
        None, ge=-10, le=10,
        description="How strongly the LoRA applies (0 = not at all); default: its registry or preload scale, else 1.",
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    def to_domain(self) -> LoraSpec:
        return LoraSpec(name=self.name, weight_name=self.weight_name, scale=self.scale)


class LoraUsed(BaseModel):
    name: str = Field(description="The LoRA as the request named it.")
    adapter_name: str = Field(description="Its adapter in the loaded pipeline (see GET /loras).")
    scale: float = Field(description="The scale it ran at.")
    trigger_words: list[str] = Field(description="Words appended to the prompt for it (unless already there).")

    @classmethod
    def from_domain(cls, lora: ActiveLora) -> LoraUsed:
        return cls(name=lora.name, adapter_name=lora.adapter_name, scale=lora.scale,
                   trigger_words=list(lora.trigger_words))


# SDXL's size conditioning: two numbers in the order diffusers uses, (height, width) and (top, left).
SizePair = tuple[Annotated[int, Field(ge=1, le=16384)], Annotated[int, Field(ge=1, le=16384)]]
CropPair = tuple[Annotated[int, Field(ge=0, le=16384)], Annotated[int, Field(ge=0, le=16384)]]


class HiresBody(BaseModel):
    """Hires fix: the first pass at the request's size, an upscale, then img2img at the larger size."""

    model_config = ConfigDict(extra="forbid")

    scale: float | None = Field(
        None, gt=1, le=8, description="Upscale factor of the request's width and height (which it then needs); "
        "the result is rounded down to multiples of 8.",
    )
    width: int | None = Field(None, ge=64, multiple_of=8, description="Final width (instead of scale).")
    height: int | None = Field(None, ge=64, multiple_of=8, description="Final height (instead of scale).")
    upscaler: HiresUpscaler = Field(
        "latent", description="latent (bilinear on the latents), latent-nearest, lanczos or nearest (on the image)."
    )
    steps: int | None = Field(None, ge=1, description="Steps of the second pass; default: the request's steps.")
    strength: float = Field(0.7, gt=0, le=1, description="How far the second pass moves from the upscaled image.")

    @model_validator(mode="after")
    def _size_or_scale(self) -> HiresBody:
        if self.scale is None and (self.width is None or self.height is None):
            raise ValueError("hires needs a scale, or both width and height")
        return self

    def to_domain(self, width: int | None, height: int | None) -> HiresFix:
        if self.width is not None and self.height is not None:
            return HiresFix(self.width, self.height, self.upscaler, self.steps, self.strength)
        if width is None or height is None:
            raise InvalidRequest("hires.scale needs the request's width and height (or give hires.width and "
                                 "hires.height)")
        assert self.scale is not None
        scaled = (int(width * self.scale) // 8 * 8, int(height * self.scale) // 8 * 8)
        return HiresFix(*scaled, self.upscaler, self.steps, self.strength)


class GenerationBody(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    prompt: str = Field(min_length=1, max_length=20_000, description="What the image should show.")
    negative_prompt: str | None = Field(None, max_length=20_000, description="What it should not show.")
    cfg_scale: float | None = Field(
        None, ge=0, le=50, validation_alias=AliasChoices("cfg_scale", "guidance_scale"),
        description="Classifier-free guidance: how strongly to follow the prompt. Default: the model family's "
        "(SD 1.x 7, SDXL 5, SD 3.x 7). FLUX has none: there it sets FLUX's guidance (default 3.5).",
    )
    steps: int = Field(
        30, ge=1, validation_alias=AliasChoices("steps", "num_inference_steps"),
        description="Denoising steps (upper limit: SDSERVE_MAX_STEPS).",
    )
    number_of_images: int = Field(
        1, ge=1, validation_alias=AliasChoices("number_of_images", "num_images"),
        description="Images to generate; image i uses seed + i.",
    )
    seed: int | None = Field(
        None, ge=-1, le=MAX_SEED, description="Random seed; omitted, null or -1 draws one, returned in `seeds`."
    )
    width: int | None = Field(
        None, ge=64, multiple_of=8, description="Output width; default: the input image's or the model's."
    )
    height: int | None = Field(
        None, ge=64, multiple_of=8, description="Output height; default: the input image's or the model's."
    )
    model: str | None = Field(
        None, max_length=200, description="Registry name of the base model; default SDSERVE_DEFAULT_MODEL."
    )
    scheduler: str | None = Field(
        None, max_length=64, description="Scheduler name (see GET /health); default: the model's."
    )
    output_format: OutputFormat = Field("png", description="Encoding of the returned images.")
    loras: list[LoraBody] = Field(
        default_factory=list, max_length=32,
        description='LoRAs to apply, each with its own scale: [{"name": "my-style", "scale": 0.8}, ...]. '
        "None: the plain base model.",
    )
    save: bool | None = Field(
        None, description="Save the images as PNG with their parameters and list them in GET /images; "
        "default SDSERVE_SAVE_IMAGES.",
    )
    controlnet: list[ControlNetBody] | None = Field(
        None, description='A ControlNet steering the image: {"name": "demo-controlnet", "image": "<base64>", '
        '"scale": 1.0}, or a list of them, each with its own image (multi-ControlNet). None: no ControlNet.',
    )
    # What only some model families take; sent to another family they are a 422 naming the field and the family.
    prompt_2: str | None = Field(
        None, max_length=20_000, description="SDXL, SD 3.x, FLUX: the prompt for the second text encoder (SDXL's "
        "OpenCLIP, SD 3's CLIP-G, FLUX's T5); default: prompt.",
    )
    negative_prompt_2: str | None = Field(
        None, max_length=20_000, description="SDXL, SD 3.x: the negative prompt for the second text encoder.",
    )
    prompt_3: str | None = Field(None, max_length=20_000, description="SD 3.x: the prompt for the T5 encoder.")
    negative_prompt_3: str | None = Field(
        None, max_length=20_000, description="SD 3.x: the negative prompt for the T5 encoder."
    )
    original_size: SizePair | None = Field(
        None, description="SDXL size conditioning, [height, width]: the size the image seems to come from "
        "(default: the output size; smaller looks lower-resolution).",
    )
    target_size: SizePair | None = Field(
        None, description="SDXL size conditioning, [height, width]: the size aimed at (default: the output size).",
    )
    crops_coords_top_left: CropPair | None = Field(
        None, description="SDXL crop conditioning, [top, left]: [0, 0] (the default) gives centred subjects.",
    )
    guidance: float | None = Field(
        None, ge=0, le=50, description="FLUX: its distilled guidance (FLUX.1-dev embeds it); default cfg_scale if "
        "given, else 3.5.",
    )
    refiner: str | None = Field(
        None, min_length=1, max_length=200, description="SDXL: the registry name of an SDXL refiner that runs the "
        "last steps on the base's latents.",
    )
    refiner_switch_at: float | None = Field(
        None, gt=0, lt=1, validation_alias=AliasChoices("refiner_switch_at", "denoising_end"),
        description="SDXL with a refiner: the fraction of the steps the base runs before the refiner takes over "
        "(diffusers' denoising_end); default 0.8.",
    )
    hires: HiresBody | None = Field(
        None, description='A second pass at a larger size (A1111\'s hires fix, text2img only): {"scale": 2} or '
        '{"width": 1024, "height": 1024}, "upscaler", "steps", "strength". None: one pass.',
    )

    @field_validator("controlnet", mode="before")
    @classmethod
    def _one_controlnet(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("seed")
    @classmethod
    def _random_seed_sentinel(cls, seed: int | None) -> int | None:
        return None if seed == -1 else seed

    # The task this body asks for: each route's body class sets its own.
    TASK: ClassVar[Task] = "text2img"

    def to_domain(self) -> GenerationRequest:
        """The one mapping from a native body to the engine's request."""
        return GenerationRequest(
            task=self.TASK,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            model=self.model,
            width=self.width,
            height=self.height,
            steps=self.steps,
            guidance_scale=self.cfg_scale,
            num_images=self.number_of_images,
            seed=self.seed,
            strength=getattr(self, "strength", None),
            scheduler=self.scheduler,
            image=getattr(self, "image", None),
            mask_image=getattr(self, "mask_image", None),
            loras=tuple(lora.to_domain() for lora in self.loras),
            controlnets=tuple(control.to_spec() for control in self.controlnet or ()),
            hires=self.hires.to_domain(self.width, self.height) if self.hires else None,
            prompt_2=self.prompt_2,
            negative_prompt_2=self.negative_prompt_2,
            prompt_3=self.prompt_3,
            negative_prompt_3=self.negative_prompt_3,
            original_size=self.original_size,
            target_size=self.target_size,
            crops_coords_top_left=self.crops_coords_top_left,
            guidance=self.guidance,
            refiner=self.refiner,
            refiner_switch_at=self.refiner_switch_at,
        )

    def options(self, source: str) -> JobOptions:
        # The job belongs to the key of the request that submits it: only it (or an admin key) may cancel it.
        return JobOptions(save=self.save, output_format=self.output_format, source=source, owner=current_owner())


class Text2ImgBody(GenerationBody):
    TASK: ClassVar[Task] = "text2img"


class Img2ImgBody(GenerationBody):
    TASK: ClassVar[Task] = "img2img"
    image: Base64Image = Field(description="The starting image, base64 or a data URL.")
    strength: float | None = Field(
        None, gt=0, le=1, description="How far to move from the input: near 0 keeps it, 1 ignores it (0.75)."
    )


class InpaintingBody(Img2ImgBody):
    TASK: ClassVar[Task] = "inpainting"
    mask_image: Base64Image = Field(
        description="White where the image is repainted, black where it is kept; resized to the image if needed."
    )
    strength: float | None = Field(None, gt=0, le=1, description="How much of the masked area changes (1.0).")


class Parameters(BaseModel):
    task: Task
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    cfg_scale: float
    strength: float | None
    scheduler: str
    number_of_images: int
    seed: int
    output_format: OutputFormat
    loras: list[LoraUsed] = Field(default_factory=list, description="The LoRAs used, with their resolved scales.")
    controlnet: ControlNetUsed | list[ControlNetUsed] | None = Field(
        None, description="The ControlNet used, if any, with its scale (a list when the request named several)."
    )
    hires: HiresBody | None = Field(None, description="The hires fix, if any; width and height are its final size.")
    stopped_at_step: int | None = Field(None, description="Finished early at this step (A1111's interrupt).")
    family: FamilyName | None = Field(None, description="The model's family: sd, sdxl, sdxl-refiner, sd3, flux.")
    family_arguments: dict[str, Any] = Field(
        default_factory=dict, description="The family's own fields it ran with (prompt_2, original_size, refiner "
        "and refiner_switch_at, guidance, ...): send them back with the rest to make the same image.",
    )


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="Base64-encoded images, in `output_format`.")
    seeds: list[int] = Field(description="The seed of each image: send it with number_of_images 1 to redo one.")
    model: str
    parameters: Parameters
    timings: dict[str, float] = Field(description="Seconds: queued, inference, encoding, total.")
    job_id: str
    cached: bool = Field(False, description="Answered from the result cache (same request and explicit seed).")

    @classmethod
    def from_snapshot(cls, job: JobSnapshot, images: list[str], timings: dict[str, float]) -> GenerationResponse:
        """The one place a finished generation becomes an answer: live, from the result cache, or recorded."""
        result = job.result
        if result is None:
            raise ValueError(f"job {job.id} has no result")
        parameters = Parameters(
            task=job.task,
            prompt=job.prompt,
            negative_prompt=job.negative_prompt,
            width=result.width,
            height=result.height,
            steps=result.steps,
            cfg_scale=result.guidance_scale,
            strength=result.strength,
            scheduler=result.scheduler,
            number_of_images=len(images),
            seed=result.seeds[0],
            output_format=job.options.output_format,  # type: ignore[arg-type]
            loras=[LoraUsed.from_domain(lora) for lora in result.loras],
            controlnet=ControlNetUsed.echo(result.controlnets),
            hires=HiresBody(width=result.hires.width, height=result.hires.height, upscaler=result.hires.upscaler,
                            steps=result.hires.steps, strength=result.hires.strength) if result.hires else None,
            stopped_at_step=result.stopped_at_step,
            family=result.family,  # type: ignore[arg-type]
            family_arguments=result.family_arguments,
        )
        return cls(images=images, seeds=result.seeds, model=result.model, parameters=parameters,
                   timings=timings, job_id=job.id, cached=job.cached)


class ModelInfo(BaseModel):
    name: str
    kind: ModelKind
    source: str
    base: str | None = None
    scale: float = 1.0
    trigger_words: list[str] = []
    description: str | None = None
    family: FamilyName | None = Field(
        None, description="sd, sdxl, sdxl-refiner, sd3 or flux (an adapter: its base's); null when it cannot be told "
        "without loading the model",
    )
    sha256: str | None = None
    created_by: str | None = None
    created_at: datetime | None = None
    backend: Literal["torch", "openvino"] | None = None
    loaded: bool = False

    @classmethod
    def from_entry(cls, name: str, entry: RegistryEntry, loaded: tuple[str, ...]) -> ModelInfo:
        return cls(name=name, loaded=name in loaded, **entry.model_dump(exclude={"weight_name", "config"}))


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class RegisterModelBody(BaseModel):
    """A registry entry from a client. Every write rewrites the registry file, so each field is bounded; a
    `source` or `config` that is a path must lie inside the folders weights may be read from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    kind: ModelKind = "base"
    source: str = Field(min_length=1, max_length=1000)
    base: str | None = Field(None, pattern=NAME_PATTERN)
    weight_name: str | None = Field(None, min_length=1, max_length=255)
    config: str | None = Field(None, min_length=1, max_length=1000)
    family: FamilyName | None = None
    scale: float = Field(1.0, ge=-10, le=10)
    trigger_words: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field([], max_length=32)
    description: str | None = Field(None, max_length=2000)
    backend: Literal["torch", "openvino"] | None = Field(
        None, description="How this base runs: torch or openvino (CPU fast path); default: SDSERVE_BACKEND"
    )
    replace: bool = False

    def to_entry(self) -> RegistryEntry:
        return RegistryEntry(**self.model_dump(exclude={"name", "replace"}))


class Health(BaseModel):
    status: Literal["ok", "loading", "degraded", "stopped"]
    worker: str
    default_model: str
    loaded_models: list[str]
    queue_depth: int
    device: dict[str, Any]
    schedulers: list[str]
    error: str | None = None


class ErrorBody(BaseModel):
    detail: str
