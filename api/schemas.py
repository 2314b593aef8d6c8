"""Request and response models of the native API. Field names follow seed 002 (prompt, cfg_scale, steps,
number_of_images, seed, width, height, image, mask_image); common aliases from other servers are accepted."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from api.controlnet_schemas import ControlNetBody, ControlNetUsed
from api.images import Base64Image, OutputFormat
from models.adapters import ActiveLora, LoraSpec
from models.engine import MAX_SEED, GenerationRequest, GenerationResult

Task = Literal["text2img", "img2img", "inpainting"]


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


class GenerationBody(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    prompt: str = Field(min_length=1, max_length=20_000, description="What the image should show.")
    negative_prompt: str | None = Field(None, max_length=20_000, description="What it should not show.")
    cfg_scale: float = Field(
        7.0, ge=0, le=50, validation_alias=AliasChoices("cfg_scale", "guidance_scale"),
        description="Classifier-free guidance: how strongly to follow the prompt.",
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
    model: str | None = Field(None, description="Registry name of the base model; default SDSERVE_DEFAULT_MODEL.")
    scheduler: str | None = Field(None, description="Scheduler name (see GET /health); default: the model's.")
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
    controlnet: ControlNetBody | None = Field(
        None, description='A ControlNet steering the image: {"name": "demo-controlnet", "image": "<base64>", '
        '"scale": 1.0}. None: no ControlNet.',
    )

    @field_validator("seed")
    @classmethod
    def _random_seed_sentinel(cls, seed: int | None) -> int | None:
        return None if seed == -1 else seed

    def to_request(self, task: Task, **images: Any) -> GenerationRequest:
        return GenerationRequest(
            task=task,
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
            loras=[lora.to_domain() for lora in self.loras],
            controlnet=self.controlnet.to_spec() if self.controlnet else None,
            control_image=self.controlnet.image if self.controlnet else None,
            **images,
        )


class Text2ImgBody(GenerationBody):
    def to_domain(self) -> GenerationRequest:
        return self.to_request("text2img")


class Img2ImgBody(GenerationBody):
    image: Base64Image = Field(description="The starting image, base64 or a data URL.")
    strength: float | None = Field(
        None, gt=0, le=1, description="How far to move from the input: near 0 keeps it, 1 ignores it (0.75)."
    )

    def to_domain(self) -> GenerationRequest:
        return self.to_request("img2img", image=self.image)


class InpaintingBody(Img2ImgBody):
    mask_image: Base64Image = Field(
        description="White where the image is repainted, black where it is kept; resized to the image if needed."
    )
    strength: float | None = Field(None, gt=0, le=1, description="How much of the masked area changes (1.0).")

    def to_domain(self) -> GenerationRequest:
        return self.to_request("inpainting", image=self.image, mask_image=self.mask_image)


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
    controlnet: ControlNetUsed | None = Field(None, description="The ControlNet used, if any, with its scale.")


class GenerationResponse(BaseModel):
    images: list[str] = Field(description="Base64-encoded images, in `output_format`.")
    seeds: list[int] = Field(description="The seed of each image: send it with number_of_images 1 to redo one.")
    model: str
    parameters: Parameters
    timings: dict[str, float] = Field(description="Seconds: queued, inference, encoding, total.")
    job_id: str
    cached: bool = Field(False, description="Answered from the result cache (same request and explicit seed).")

    @classmethod
    def build(
        cls, body: GenerationBody, task: Task, job_id: str, result: GenerationResult, images: list[str],
        timings: dict[str, float], cached: bool = False,
    ) -> GenerationResponse:
        return cls.from_result(job_id, task, body.prompt, body.negative_prompt, body.output_format, result, images,
                               timings, cached)

    @classmethod
    def from_result(
        cls, job_id: str, task: Task, prompt: str, negative_prompt: str | None, output_format: OutputFormat,
        result: GenerationResult, images: list[str], timings: dict[str, float], cached: bool = False,
    ) -> GenerationResponse:
        """The one place a finished generation becomes an answer, for live requests and recorded jobs alike."""
        parameters = Parameters(
            task=task,
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=result.width,
            height=result.height,
            steps=result.steps,
            cfg_scale=result.guidance_scale,
            strength=result.strength,
            scheduler=result.scheduler,
            number_of_images=len(images),
            seed=result.seeds[0],
            output_format=output_format,
            loras=[LoraUsed.from_domain(lora) for lora in result.loras],
            controlnet=ControlNetUsed.from_domain(getattr(result, "controlnet", None)),
        )
        return cls(images=images, seeds=result.seeds, model=result.model, parameters=parameters,
                   timings=timings, job_id=job_id, cached=cached)


class ModelInfo(BaseModel):
    name: str
    kind: str
    source: str
    base: str | None = None
    scale: float = 1.0
    trigger_words: list[str] = []
    description: str | None = None
    sha256: str | None = None
    created_by: str | None = None
    created_at: datetime | None = None
    backend: Literal["torch", "openvino"] | None = None
    loaded: bool = False


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class RegisterModelBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    kind: Literal["base", "lora", "dreambooth", "controlnet"] = "base"
    source: str = Field(min_length=1)
    base: str | None = None
    weight_name: str | None = None
    config: str | None = None
    scale: float = 1.0
    trigger_words: list[str] = []
    description: str | None = None
    backend: Literal["torch", "openvino"] | None = Field(
        None, description="How this base runs: torch or openvino (CPU fast path); default: SDSERVE_BACKEND"
    )
    replace: bool = False


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
