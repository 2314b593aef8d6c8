"""One generation: check a request before it is queued, then run it on its pipeline. Runs on the worker thread
(check_request also on the submitting thread)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from models import metrics
from models.engine.loras import with_trigger_words
from models.engine.pipelines import LoadedModel
from models.engine.schedulers import make_scheduler, scheduler_names
from models.errors import InvalidRequest, JobCancelled
from models.settings import Settings
from models.tasks import TaskSpec, fit_image, task_spec
from models.types import ActiveLora, ControlNetUse, GenerationRequest, GenerationResult

StepCallback = Callable[[int, int], None]
LatentsCallback = Callable[[int, torch.Tensor], None]


def check_request(request: GenerationRequest, settings: Settings) -> None:
    """Everything that can be known before the model is loaded: limits from settings, the task's inputs, the
    scheduler's name. The schema already checked types, ranges and multiples of 8."""
    spec = task_spec(request.task)
    problems = spec.check_inputs(request)
    problems += _size_problems(request, settings)
    if request.steps > settings.max_steps:
        problems.append(f"steps {request.steps} is over the limit {settings.max_steps} (SDSERVE_MAX_STEPS)")
    if request.num_images > settings.max_images:
        problems.append(
            f"number_of_images {request.num_images} is over the limit {settings.max_images} (SDSERVE_MAX_IMAGES)"
        )
    if len(request.loras) > settings.max_loras_per_request:
        problems.append(f"{len(request.loras)} LoRAs in one request; at most {settings.max_loras_per_request} "
                        "(SDSERVE_MAX_LORAS_PER_REQUEST)")
    if request.scheduler is not None and request.scheduler not in scheduler_names():
        problems.append(f"unknown scheduler {request.scheduler!r}; choose one of: {', '.join(scheduler_names())}")
    strength = spec.strength(request)
    if strength is not None and int(request.steps * strength) < 1:
        problems.append(f"strength {strength} with {request.steps} steps runs no denoising step; "
                        "raise strength or steps so that strength x steps >= 1")
    if problems:
        raise InvalidRequest("; ".join(problems))


MIN_SIDE = 64


def size_from_image(request: GenerationRequest) -> tuple[int, int] | None:
    """The output size of a request with an input image: each side as asked, else the image's own (down to a
    multiple of 8). None without an input image (the model's native size fills in what is missing)."""
    if request.image is None:
        return None
    image_width, image_height = request.image.size
    return request.width or image_width - image_width % 8, request.height or image_height - image_height % 8


def _size_problems(request: GenerationRequest, settings: Settings) -> list[str]:
    """Both sides of the output, as they will be once resolved from an input image, inside the limits; and the
    decoded input images of the request inside its pixel budget."""
    problems = []
    resolved = size_from_image(request)
    width, height = resolved or (request.width, request.height)
    from_image = " (taken from the input image; set width and height to resize it)" if resolved else ""
    for side, value, limit, setting in (("width", width, settings.max_width, "SDSERVE_MAX_WIDTH"),
                                        ("height", height, settings.max_height, "SDSERVE_MAX_HEIGHT")):
        if value is not None and value > limit:
            problems.append(f"{side} {value}{from_image} is over the limit {limit} ({setting})")
        elif value is not None and value < MIN_SIDE:
            problems.append(f"{side} {value}{from_image} is under the minimum {MIN_SIDE}")
    inputs = [request.image, request.mask_image, request.controlnet.image if request.controlnet else None]
    pixels = sum(image.width * image.height for image in inputs if image is not None)
    if pixels > settings.max_input_pixels:
        problems.append(f"the input images hold {pixels} pixels together; at most {settings.max_input_pixels} "
                        "(SDSERVE_MAX_INPUT_PIXELS)")
    return problems


def resolve_size(request: GenerationRequest, model: LoadedModel) -> tuple[int, int]:
    """Explicit size, else the input image's size (down to a multiple of 8), else the model's native size."""
    resolved = size_from_image(request)
    if resolved is not None:
        return resolved
    native_width, native_height = model.default_size()
    return request.width or native_width, request.height or native_height


def batch_key(request: GenerationRequest, model: str) -> tuple[Any, ...] | None:
    """Requests with equal keys can share one pipeline call (micro-batching): the same model, task, size, steps,
    scheduler, guidance, strength and LoRAs at the same scales. Prompts, negative prompts, seeds, image counts and
    input images may differ. None: the request runs alone (a ControlNet's conditioning image is per call)."""
    if request.controlnet is not None:
        return None
    input_size = request.image.size if request.image is not None else None
    return (model, request.task, request.width, request.height, input_size, request.steps, request.scheduler,
            request.guidance_scale, request.strength, request.loras)


def generate(
    pipeline: DiffusionPipeline,
    model: LoadedModel,
    request: GenerationRequest,
    on_step: StepCallback,
    is_cancelled: Callable[[], bool],
    on_latents: LatentsCallback | None = None,
) -> GenerationResult:
    """Run one request (its seed already drawn) on `pipeline`, a pipeline of `model` for the request's task."""
    return generate_batch(pipeline, model, [request], on_step, is_cancelled, on_latents)[0]


def generate_batch(
    pipeline: DiffusionPipeline,
    model: LoadedModel,
    requests: list[GenerationRequest],
    on_step: StepCallback,
    is_cancelled: Callable[[], bool],
    on_latents: LatentsCallback | None = None,
) -> list[GenerationResult]:
    """Run requests with one batch key in one pipeline call: one entry (prompt, generator, input image) per image,
    so each image starts from its own seed's noise; `on_latents` gets every image's latents, in request order."""
    # 1. What the requests resolve to on this model: the same size, scheduler and LoRAs for all (their key).
    started = time.perf_counter()
    first = requests[0]
    spec = task_spec(first.task)
    if any(request.seed is None for request in requests):
        raise ValueError("the engine draws the seed before a request runs")
    width, height = resolve_size(first, model)
    seeds = [[request.seed + index for index in range(request.num_images)] for request in requests]  # type: ignore[operator]
    counts = [request.num_images for request in requests]
    # 2. A scheduler of its own (never one shared with an earlier run) and exactly the requests' LoRAs.
    pipeline.scheduler = make_scheduler(first.scheduler, model.scheduler_config)
    loras = model.loras.activate(first.loras)
    prompts = [with_trigger_words(request.prompt, loras) for request in requests]
    # 3. The call: CPU generators give the same starting noise on every device, so a seed reproduces anywhere.
    negatives = [request.negative_prompt or "" for request in requests]
    arguments: dict[str, Any] = {
        "prompt": _per_image(prompts, counts),
        "negative_prompt": _per_image(negatives, counts) if any(negatives) else None,
        "num_inference_steps": first.steps,
        "guidance_scale": first.guidance_scale,
        "num_images_per_prompt": 1,
        "generator": [torch.Generator("cpu").manual_seed(seed) for batch in seeds for seed in batch],
        "callback_on_step_end": _step_hook(metrics.StepMeter(model.name, on_step), is_cancelled, on_latents),
    }
    per_request = [spec.image_arguments(request, width, height) for request in requests]
    for name, value in per_request[0].items():
        arguments[name] = _per_image([each[name] for each in per_request], counts) if name in _PER_IMAGE else value
    if len(requests) == 1:
        arguments |= _controlnet_arguments(spec, first, width, height)
    with torch.inference_mode():
        images = pipeline(**arguments).images
    if is_cancelled():
        raise JobCancelled("cancelled")
    # 4. Inpainting keeps the pixels outside the mask exactly: a VAE round trip would shift them slightly.
    if spec.needs_mask:
        images = [Image.composite(generated, picture, mask)
                  for generated, picture, mask in zip(images, arguments["image"], arguments["mask_image"], strict=True)]
    seconds = round(time.perf_counter() - started, 4)
    results, offset = [], 0
    for request, prompt, request_seeds in zip(requests, prompts, seeds, strict=True):
        results.append(_result(request, model, images[offset:offset + request.num_images], request_seeds, prompt,
                               width, height, spec.strength(request), loras, seconds, len(images)))
        offset += request.num_images
    return results


# The pipeline arguments given once per image in a batch; the others are the same for every request of a batch.
_PER_IMAGE = ("image", "mask_image")


def _per_image(values: list[Any], counts: list[int]) -> list[Any]:
    return [value for value, count in zip(values, counts, strict=True) for _ in range(count)]


def _result(
    request: GenerationRequest, model: LoadedModel, images: list[Image.Image], seeds: list[int], prompt: str,
    width: int, height: int, strength: float | None, loras: tuple[ActiveLora, ...], seconds: float, batch_images: int,
) -> GenerationResult:
    controlnet = request.controlnet
    timings = {"inference_s": seconds}
    if batch_images > len(images):
        timings["batch_images"] = batch_images  # it shared its pipeline call with other requests
    return GenerationResult(
        images=images,
        seeds=seeds,
        model=model.name,
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        width=width,
        height=height,
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        strength=strength,
        scheduler=request.scheduler or model.scheduler_config["_class_name"],
        scheduler_name=request.scheduler,
        loras=loras,
        controlnet=ControlNetUse(controlnet.name, controlnet.scale) if controlnet else None,
        model_sha256=model.entry.sha256,
        timings=timings,
    )


def _step_hook(
    on_step: StepCallback, is_cancelled: Callable[[], bool], on_latents: LatentsCallback | None
) -> Callable[..., dict[str, Any]]:
    def step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_latents is not None and "latents" in tensors:
            on_latents(step + 1, tensors["latents"])
        on_step(step + 1, pipe.num_timesteps)
        if is_cancelled():
            # Raising from the step hook stops at once; the interrupt flag would still run the remaining loop
            # and the VAE decode (a second or more on CPU) for an image nobody wants.
            raise JobCancelled("cancelled")
        return tensors

    return step_end


def _controlnet_arguments(spec: TaskSpec, request: GenerationRequest, width: int, height: int) -> dict[str, Any]:
    if request.controlnet is None:
        return {}
    control = request.controlnet
    return {
        spec.control_image_argument: fit_image(control.image, width, height, "RGB"),
        "controlnet_conditioning_scale": control.scale,
    }

