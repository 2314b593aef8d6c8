"""The earlier servers' shapes (seeds 000, 003, 004): schemas, translate-in, translate-out.

- Seed 000: a form posted to /submit (strings "null" for "not given", two LoRA slots); one PNG back.
- Seed 003: /generate-image/ (a form, an optional control image; LoRAs and ControlNets loaded ahead with
  /load-lora/ and /load-controlnet/ apply to every generation after); one PNG back.
- Seed 004: /imagine with optimizedSD's names; a PNG stream or a JSON array of base64 images. n_iter iterations
  of n_samples images each run as one job per iteration (so 2 x 5 works within SDSERVE_MAX_IMAGES).
- Seed 002: its README posts to /generate/; that is /text2img.
- Seed 001: its random diffusion is in api/compat/random_diffusion.py.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Response
from PIL import Image
from pydantic import AliasChoices, BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.compat.shared import build_body, none_if_sentinel, png_response_body, resolve_model_alias
from api.controlnet_schemas import LoadedControlNet
from api.images import Base64Image, encode_image, encode_images
from api.lora_schemas import LoadedLora, LoadLoraBody
from api.schemas import GenerationBody, Img2ImgBody, Text2ImgBody
from models.errors import InvalidRequest
from models.registry import RegistryEntry
from models.sources import ADAPTER_NAME_PATTERN
from models.types import MAX_SEED, JobSnapshot

SEED_000_DEFAULT_MODEL = "runwayml/stable-diffusion-v1-5"


# -- seed 000 -------------------------------------------------------------------------------------------------------
def submit_body(entries: dict[str, RegistryEntry], form: dict[str, Any]) -> GenerationBody:
    """Seed 000's form fields -> a native text2img body."""
    loras = [
        {"name": none_if_sentinel(path), "weight_name": none_if_sentinel(weight),
         "scale": form["cross_attention_kwargs"]}
        for path, weight in ((form["lora_hugging_face_1"], form["weight_name_1"]),
                             (form["lora_hugging_face_2"], form["weight_name_2"]))
        if none_if_sentinel(path)
    ]
    return build_body(
        Text2ImgBody,
        prompt=form["text_prompt"],
        negative_prompt=none_if_sentinel(form["negative_prompt"]),
        model=resolve_model_alias(entries, form["modelid"], ignored=(SEED_000_DEFAULT_MODEL,)),
        number_of_images=form["total_nm_img_prompt"],
        steps=form["inference_steps"],
        cfg_scale=form["guidance_scale"],
        seed=form["manual_seed"],
        loras=loras or None,
    )


async def png_answer(job: JobSnapshot) -> Response:
    """Seeds 000 and 003 answer with the first image as a PNG; the seeds go in a header."""
    assert job.result is not None
    content = await png_response_body(job.result.images[0])
    return Response(content, media_type="image/png", headers={"X-Seeds": ",".join(map(str, job.result.seeds))})


# -- seed 003 -------------------------------------------------------------------------------------------------------
def generate_image_body(
    prompt: str, width: int | None, height: int | None, steps: int, guidance_scale: float, preloaded_loras: list[str],
    control_image: Image.Image | None, controlnet: str | None,
) -> GenerationBody:
    """Seed 003's /generate-image/ form -> a native text2img body with the adapters loaded ahead."""
    steering = None
    if control_image is not None:
        # Like seed 003: a control image runs the ControlNet loaded last with /load-controlnet/.
        if controlnet is None:
            raise InvalidRequest("a control_image needs a ControlNet: load one first with POST /load-controlnet/ "
                                 "(controlnet_path=demo-controlnet, for example), or send no control_image")
        steering = {"name": controlnet, "image": encode_image(control_image)}
    return build_body(Text2ImgBody, prompt=prompt, width=width, height=height, steps=steps,
                      cfg_scale=guidance_scale, loras=[{"name": name} for name in preloaded_loras] or None,
                      controlnet=steering)


class LoadLoraCompatBody(BaseModel):
    """Seed 003's /load-lora/ fields, as JSON, form fields or query parameters."""

    model_config = ConfigDict(extra="ignore")

    lora_path: str = Field(min_length=1, max_length=1000, description="LoRA file or folder (highest step wins).")
    adapter_name: str | None = Field(None, pattern=ADAPTER_NAME_PATTERN)
    lora_scale: float = Field(1.0, ge=-10, le=10)
    weight_name: str | None = Field(None, min_length=1, max_length=255)

    def to_native(self) -> LoadLoraBody:
        return LoadLoraBody(name=self.lora_path, weight_name=self.weight_name, adapter_name=self.adapter_name,
                            scale=self.lora_scale)


class LoadLoraCompatResponse(LoadedLora):
    message: str

    @classmethod
    def from_loaded(cls, loaded: LoadedLora) -> LoadLoraCompatResponse:
        message = f"LoRA loaded into {loaded.model!r} as adapter {loaded.adapter_name!r} with scale {loaded.scale}"
        return cls(message=message, **loaded.model_dump())


class LoadControlNetCompatBody(BaseModel):
    """Seed 003's /load-controlnet/ fields, as JSON, form fields or query parameters."""

    model_config = ConfigDict(extra="ignore")

    controlnet_path: str = Field(
        min_length=1, max_length=1000,
        description="A registry name (kind controlnet), a diffusers ControlNet folder inside the allowed folders, "
        "or a Hugging Face repo id in the local cache.",
    )
    adapter_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="Name to use it by; default: controlnet_path."
    )
    lora_weights_path: str | None = Field(None, description="ControlLoRA weights: not supported (422).")
    torch_dtype: Literal["float16", "float32", "bfloat16"] | None = Field(
        None, description="Accepted for seed 003 clients and ignored: the server's device decides the dtype."
    )

    def check_supported(self) -> None:
        if self.lora_weights_path:
            raise InvalidRequest("ControlLoRA not supported: load a full diffusers ControlNet "
                                 "(send no lora_weights_path)")


class LoadControlNetCompatResponse(LoadedControlNet):
    message: str


class ActiveControlNets(BaseModel):
    active_controlnets: list[str] = Field(description="Names of the loaded ControlNets, least recently used first.")
    controlnets: list[LoadedControlNet]


class UnloadControlNetResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str


# -- seed 004 -------------------------------------------------------------------------------------------------------
class ImagineBody(BaseModel):
    """Seed 004's request: the optimizedSD names (its txt2img, and its img2img with an init image)."""

    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True, populate_by_name=True)

    prompt: str
    H: int | None = Field(None, description="height; default the model's native size (seed 004's SD 1.x: 512)")
    W: int | None = Field(None, description="width; default the model's native size")
    ddim_steps: int = 50
    n_samples: int = Field(1, ge=1, description="images per iteration")
    n_iter: int = Field(1, ge=1, description="iterations")
    scale: float = Field(7.5, description="guidance scale")
    seed: int | None = Field(None, ge=-1, le=MAX_SEED)
    init_img: Base64Image | None = Field(
        None, validation_alias=AliasChoices("init_img", "init_image", "image"),
        description="Start from this image (optimizedSD's img2img); its size unless H and W are sent.",
    )
    strength: float = Field(0.75, gt=0, le=1, description="img2img: how far to move from init_img.")

    def to_native(self) -> GenerationBody:
        common: dict[str, Any] = {"prompt": self.prompt, "steps": self.ddim_steps, "cfg_scale": self.scale,
                                  "number_of_images": self.n_samples * self.n_iter, "seed": self.seed}
        if self.init_img is not None:
            sent = self.model_fields_set
            size = {"width": self.W, "height": self.H} if {"W", "H"} & sent else {}
            return build_body(Img2ImgBody, image=self.init_img, strength=self.strength, **common, **size)
        return build_body(Text2ImgBody, width=self.W, height=self.H, **common)


async def imagine_answer(jobs: list[JobSnapshot], accept: str) -> Response | list[str]:
    """A PNG when the client accepts image/png, else the JSON array of base64 PNGs (every iteration's)."""
    if "image/png" in accept:
        return await png_answer(jobs[0])
    images = [image for job in jobs if job.result for image in job.result.images]
    return await run_in_threadpool(encode_images, images, "png")
