"""One generation: a request in domain terms, the pipeline call, the result. Runs on the worker thread."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from models import metrics
from models.adapters import ActiveLora, LoraSpec, with_trigger_words
from models.controlnets import ControlNetSpec
from models.errors import InvalidRequest, JobCancelled
from models.pipelines import LoadedModel
from models.schedulers import make_scheduler
from models.settings import Settings

logger = logging.getLogger(__name__)

Task = Literal["text2img", "img2img", "inpainting"]
MAX_SEED = 2**32 - 1
DEFAULT_STRENGTH: dict[str, float] = {"text2img": 1.0, "img2img": 0.75, "inpainting": 1.0}


@dataclass
class GenerationRequest:
    task: Task
    prompt: str
    negative_prompt: str | None = None
    model: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 30
    guidance_scale: float = 7.0
    num_images: int = 1
    seed: int | None = None
    strength: float | None = None
    scheduler: str | None = None
    image: Image.Image | None = None
    mask_image: Image.Image | None = None
    loras: list[LoraSpec] = field(default_factory=list)
    controlnet: ControlNetSpec | None = None
    control_image: Image.Image | None = None  # the ControlNet's conditioning image (edges, depth, pose...)

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = random.randint(0, MAX_SEED)


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]
    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    strength: float | None
    scheduler: str
    timings: dict[str, float] = field(default_factory=dict)
    loras: list[ActiveLora] = field(default_factory=list)
    controlnet: ControlNetSpec | None = None


StepCallback = Callable[[int, int], None]
LatentsCallback = Callable[[int, torch.Tensor], None]


def check_limits(request: GenerationRequest, settings: Settings) -> None:
    """Limits that depend on settings; the schema already checked types, ranges and multiples of 8."""
    problems = []
    if request.width is not None and request.width > settings.max_width:
        problems.append(f"width {request.width} is over the limit {settings.max_width} (SDSERVE_MAX_WIDTH)")
    if request.height is not None and request.height > settings.max_height:
        problems.append(f"height {request.height} is over the limit {settings.max_height} (SDSERVE_MAX_HEIGHT)")
    if request.steps > settings.max_steps:
        problems.append(f"steps {request.steps} is over the limit {settings.max_steps} (SDSERVE_MAX_STEPS)")
    if request.num_images > settings.max_images:
        problems.append(
            f"number_of_images {request.num_images} is over the limit {settings.max_images} (SDSERVE_MAX_IMAGES)"
        )
    if request.image is not None and request.width is None and request.height is None:
        width, height = request.image.size
        if width > settings.max_width or height > settings.max_height:
            problems.append(
                f"the input image is {width}x{height}, over the limit {settings.max_width}x{settings.max_height}; "
                "send a smaller image or set width and height to resize it"
            )
    if len(request.loras) > settings.max_loras:
        problems.append(f"{len(request.loras)} LoRAs in one request; at most {settings.max_loras} (SDSERVE_MAX_LORAS)")
    if request.task != "text2img" and request.image is None:
        problems.append(f"{request.task} needs an input image")
    if request.task == "inpainting" and request.mask_image is None:
        problems.append("inpainting needs a mask_image (white = repaint, black = keep)")
    if request.controlnet is not None and request.control_image is None:
        problems.append(f"ControlNet {request.controlnet.name!r} needs a control image")
    if problems:
        raise InvalidRequest("; ".join(problems))


def resolve_size(request: GenerationRequest, model: LoadedModel) -> tuple[int, int]:
    """Explicit size, else the input image's size (down to a multiple of 8), else the model's native size."""
    if request.image is not None:
        image_width, image_height = request.image.size
        width = request.width or max(8, image_width - image_width % 8)
        height = request.height or max(8, image_height - image_height % 8)
        return width, height
    native_width, native_height = model.default_size()
    return request.width or native_width, request.height or native_height


def generate(
    pipeline: DiffusionPipeline,
    model: LoadedModel,
    request: GenerationRequest,
    on_step: StepCallback,
    is_cancelled: Callable[[], bool],
    on_latents: LatentsCallback | None = None,
) -> GenerationResult:
    started = time.perf_counter()
    on_step = metrics.StepMeter(model.name, on_step)
    width, height = resolve_size(request, model)
    strength = request.strength if request.strength is not None else DEFAULT_STRENGTH[request.task]
    if request.task != "text2img" and int(request.steps * strength) < 1:
        raise InvalidRequest(
            f"strength {strength} with {request.steps} steps runs no denoising step; "
            "raise strength or steps so that strength x steps >= 1"
        )
    pipeline.scheduler = make_scheduler(request.scheduler, model.scheduler_config)
    # Every request sets the adapters it runs with (none disables them): nothing carries over from the last one.
    loras = model.loras.activate(request.loras) if model.loras is not None else []
    assert request.seed is not None  # drawn in __post_init__
    seeds = [request.seed + index for index in range(request.num_images)]
    # CPU generators give the same starting noise on every device, so a seed reproduces anywhere.
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    def step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_latents is not None and "latents" in tensors:
            on_latents(step + 1, tensors["latents"])
        on_step(step + 1, pipe.num_timesteps)
        if is_cancelled():
            # Raising from the step hook stops at once; the interrupt flag would still run the remaining loop
            # and the VAE decode (a second or more on CPU) for an image nobody wants.
            raise JobCancelled("cancelled")
        return tensors

    arguments: dict[str, Any] = {
        "prompt": with_trigger_words(request.prompt, loras),
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "num_images_per_prompt": request.num_images,
        "generator": generators,
        "callback_on_step_end": step_end,
    }
    image = mask = None
    if request.task == "text2img":
        arguments |= {"width": width, "height": height}
    else:
        image = _prepare_image(request.image, width, height, "RGB")
        arguments |= {"image": image, "strength": strength}
    if request.task == "inpainting":
        mask = _prepare_image(request.mask_image, width, height, "L")
        arguments |= {"mask_image": mask, "width": width, "height": height}
    if request.controlnet is not None:
        control = _prepare_image(request.control_image, width, height, "RGB")
        # The text2img ControlNet pipeline takes the control image as `image`; the others take an init image there.
        control_key = "image" if request.task == "text2img" else "control_image"
        arguments |= {control_key: control, "controlnet_conditioning_scale": request.controlnet.scale}

    with torch.inference_mode():
        images = pipeline(**arguments).images
    if is_cancelled():
        raise JobCancelled("cancelled")
    if request.task == "inpainting":
        # Keep the pixels outside the mask exactly: a VAE round trip would shift them slightly.
        images = [Image.composite(generated, image, mask) for generated in images]
    return GenerationResult(
        images=images,
        seeds=seeds,
        model=model.name,
        width=width,
        height=height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        strength=None if request.task == "text2img" else strength,
        scheduler=request.scheduler or model.scheduler_config["_class_name"],
        timings={"inference_s": round(time.perf_counter() - started, 4)},
        loras=loras,
        controlnet=request.controlnet,
    )


def _prepare_image(image: Image.Image | None, width: int, height: int, mode: str) -> Image.Image:
    if image is None:
        raise InvalidRequest("an input image is required")
    image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image
