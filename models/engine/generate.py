"""One generation: check a request before it is queued, then run it on its pipeline. Runs on the worker thread
(check_request also on the submitting thread)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from models import metrics
from models.engine import hires as hires_steps
from models.engine.loras import with_trigger_words
from models.engine.pipelines import LoadedModel
from models.engine.schedulers import make_scheduler, scheduler_names
from models.errors import InvalidRequest, JobCancelled
from models.settings import Settings
from models.tasks import TaskSpec, fit_image, task_spec
from models.types import HIRES_UPSCALERS, ActiveLora, ControlNetUse, GenerationRequest, GenerationResult

StepCallback = Callable[[int, int], None]
LatentsCallback = Callable[[int, torch.Tensor], None]


def check_request(request: GenerationRequest, settings: Settings) -> None:
    """Everything that can be known before the model is loaded: limits from settings, the task's inputs, the
    scheduler's name. The schema already checked types, ranges and multiples of 8."""
    spec = task_spec(request.task)
    problems = spec.check_inputs(request)
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
    if len(request.loras) > settings.max_loras_per_request:
        problems.append(f"{len(request.loras)} LoRAs in one request; at most {settings.max_loras_per_request} "
                        "(SDSERVE_MAX_LORAS_PER_REQUEST)")
    if request.scheduler is not None and request.scheduler not in scheduler_names():
        problems.append(f"unknown scheduler {request.scheduler!r}; choose one of: {', '.join(scheduler_names())}")
    problems += _check_controlnets_and_hires(request, settings)
    strength = spec.strength(request)
    if strength is not None and int(request.steps * strength) < 1:
        problems.append(f"strength {strength} with {request.steps} steps runs no denoising step; "
                        "raise strength or steps so that strength x steps >= 1")
    if problems:
        raise InvalidRequest("; ".join(problems))


def _check_controlnets_and_hires(request: GenerationRequest, settings: Settings) -> list[str]:
    problems = []
    controls = request.controlnets
    if len(controls) > settings.max_controlnets:
        problems.append(f"{len(controls)} ControlNets in one request; at most {settings.max_controlnets} "
                        "(SDSERVE_MAX_CONTROLNETS)")
    if len({control.guess_mode for control in controls}) > 1:
        problems.append("the ControlNets of one request need the same control mode (guess mode applies to all)")
    for control in controls:
        if not 0 <= control.guidance_start < control.guidance_end <= 1:
            problems.append(f"ControlNet {control.name!r}: guidance_start {control.guidance_start} and guidance_end "
                            f"{control.guidance_end} must satisfy 0 <= start < end <= 1")
    hires = request.hires
    if hires is not None:
        if request.task != "text2img":
            problems.append("hires fix is a second pass for text2img; send it without an input image")
        if hires.upscaler not in HIRES_UPSCALERS:
            problems.append(f"unknown hires upscaler {hires.upscaler!r}; choose one of: {', '.join(HIRES_UPSCALERS)}")
        if hires.width > settings.max_width or hires.height > settings.max_height:
            problems.append(f"hires size {hires.width}x{hires.height} is over the limit "
                            f"{settings.max_width}x{settings.max_height} (SDSERVE_MAX_WIDTH/HEIGHT)")
        if hires.width % 8 or hires.height % 8:
            problems.append(f"hires size {hires.width}x{hires.height} must be multiples of 8")
        second = hires_steps.second_pass_steps(hires, request.steps)
        if second > settings.max_steps:
            problems.append(f"hires steps {second} is over the limit {settings.max_steps} (SDSERVE_MAX_STEPS)")
        if int(second * hires.strength) < 1:
            problems.append(f"hires strength {hires.strength} with {second} steps runs no denoising step")
    return problems


def resolve_size(request: GenerationRequest, model: LoadedModel) -> tuple[int, int]:
    """Explicit size, else the input image's size (down to a multiple of 8), else the model's native size."""
    if request.image is not None:
        image_width, image_height = request.image.size
        width = request.width or max(8, image_width - image_width % 8)
        height = request.height or max(8, image_height - image_height % 8)
        return width, height
    native_width, native_height = model.default_size()
    return request.width or native_width, request.height or native_height


def batch_key(request: GenerationRequest, model: str) -> tuple[Any, ...] | None:
    """Requests with equal keys can share one pipeline call (micro-batching): the same model, task, size, steps,
    scheduler, guidance, strength and LoRAs at the same scales. Prompts, negative prompts, seeds, image counts and
    input images may differ. None: the request runs alone (ControlNets' conditioning images and a hires fix's
    second pass are per call)."""
    if request.controlnets or request.hires is not None:
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
    second_pipeline: DiffusionPipeline | None = None,
    stop_early: Callable[[], bool] | None = None,
) -> list[GenerationResult]:
    """Run requests with one batch key in one pipeline call: one entry (prompt, generator, input image) per image,
    so each image starts from its own seed's noise; `on_latents` gets every image's latents, in request order.
    A lone request may carry a hires fix, whose img2img second pass runs on `second_pipeline`. `stop_early` asks
    to finish at the next step with the images so far (A1111's interrupt)."""
    # 1. What the requests resolve to on this model: the same size, scheduler and LoRAs for all (their key).
    started = time.perf_counter()
    first = requests[0]
    spec = task_spec(first.task)
    if any(request.seed is None for request in requests):
        raise ValueError("the engine draws the seed before a request runs")
    width, height = resolve_size(first, model)
    seeds = [[request.seed + index for index in range(request.num_images)] for request in requests]  # type: ignore[operator]
    counts = [request.num_images for request in requests]
    hires = first.hires if len(requests) == 1 else None
    # 2. A scheduler of its own (never one shared with an earlier run) and exactly the requests' LoRAs.
    pipeline.scheduler = make_scheduler(first.scheduler, model.scheduler_config)
    loras = model.loras.activate(first.loras)
    prompts = [with_trigger_words(request.prompt, loras) for request in requests]
    # 3. The call: CPU generators give the same starting noise on every device, so a seed reproduces anywhere.
    progress = _Progress(on_step, second=hires_steps.expected_second_pass_steps(hires, first.steps) if hires else 0)
    stopped: dict[str, int] = {}
    negatives = [request.negative_prompt or "" for request in requests]
    all_seeds = [seed for request_seeds in seeds for seed in request_seeds]
    common: dict[str, Any] = {
        "prompt": _per_image(prompts, counts),
        "negative_prompt": _per_image(negatives, counts) if any(negatives) else None,
        "guidance_scale": first.guidance_scale,
        "num_images_per_prompt": 1,
    }
    arguments: dict[str, Any] = common | {
        "num_inference_steps": first.steps,
        "generator": _generators(all_seeds),
        "callback_on_step_end": _step_hook(metrics.StepMeter(model.name, progress.first), is_cancelled, on_latents,
                                           stop_early, stopped),
    }
    per_request = [spec.image_arguments(request, width, height) for request in requests]
    for name, value in per_request[0].items():
        arguments[name] = _per_image([each[name] for each in per_request], counts) if name in _PER_IMAGE else value
    if len(requests) == 1:
        arguments |= _controlnet_arguments(spec, first, width, height)
    if hires is not None and hires_steps.is_latent(hires):
        arguments["output_type"] = "latent"
    with torch.inference_mode():
        images = pipeline(**arguments).images
    if is_cancelled():
        raise JobCancelled("cancelled")
    # 4. Hires fix: upscale the first pass and run img2img at the larger size (skipped once asked to stop early).
    first_pass_size = None
    if hires is not None:
        first_pass_size = (width, height)
        if stopped:
            images = _decoded(pipeline, images) if hires_steps.is_latent(hires) else images
        else:
            assert second_pipeline is not None, "the worker derives the img2img pipeline for hires requests"
            images = _second_pass(second_pipeline, model, first, common, all_seeds, images, progress, is_cancelled,
                                  stop_early, stopped)
            width, height = hires.width, hires.height
    # 5. Inpainting keeps the pixels outside the mask exactly: a VAE round trip would shift them slightly.
    if spec.needs_mask:
        images = [Image.composite(generated, picture, mask)
                  for generated, picture, mask in zip(images, arguments["image"], arguments["mask_image"], strict=True)]
    seconds = round(time.perf_counter() - started, 4)
    results, offset = [], 0
    for request, prompt, request_seeds in zip(requests, prompts, seeds, strict=True):
        result = _result(request, model, images[offset:offset + request.num_images], request_seeds, prompt,
                         (width, height), loras, seconds, len(images))
        results.append(replace(result, hires=hires, first_pass_size=first_pass_size,
                               stopped_at_step=stopped.get("step")))
        offset += request.num_images
    return results


# The pipeline arguments given once per image in a batch; the others are the same for every request of a batch.
_PER_IMAGE = ("image", "mask_image")


def _per_image(values: list[Any], counts: list[int]) -> list[Any]:
    return [value for value, count in zip(values, counts, strict=True) for _ in range(count)]


def _result(
    request: GenerationRequest, model: LoadedModel, images: list[Image.Image], seeds: list[int], prompt: str,
    size: tuple[int, int], loras: tuple[ActiveLora, ...], seconds: float, batch_images: int,
) -> GenerationResult:
    timings = {"inference_s": seconds}
    if batch_images > len(images):
        timings["batch_images"] = batch_images  # it shared its pipeline call with other requests
    return GenerationResult(
        images=images,
        seeds=seeds,
        model=model.name,
        prompt=prompt,
        negative_prompt=request.negative_prompt,
        width=size[0],
        height=size[1],
        steps=request.steps,
        guidance_scale=request.guidance_scale,
        strength=task_spec(request.task).strength(request),
        scheduler=request.scheduler or model.scheduler_config["_class_name"],
        scheduler_name=request.scheduler,
        loras=loras,
        controlnets=tuple(ControlNetUse(c.name, c.scale, c.guidance_start, c.guidance_end, c.guess_mode)
                          for c in request.controlnets),
        model_sha256=model.entry.sha256,
        timings=timings,
    )


def _generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def _second_pass(
    pipeline: DiffusionPipeline, model: LoadedModel, request: GenerationRequest, common: dict[str, Any],
    seeds: list[int], first: Any, progress: _Progress, is_cancelled: Callable[[], bool],
    stop_early: Callable[[], bool] | None, stopped: dict[str, int],
) -> list[Image.Image]:
    """Hires fix's img2img pass on the upscaled first pass, with the same seeds (as A1111 does)."""
    hires = request.hires
    assert hires is not None
    pipeline.scheduler = make_scheduler(request.scheduler, model.scheduler_config)
    arguments = common | {
        "image": hires_steps.upscale(first, hires, model.base.vae_scale_factor),
        "strength": hires.strength,
        "num_inference_steps": hires_steps.second_pass_steps(hires, request.steps),
        "generator": _generators(seeds),
        "callback_on_step_end": _step_hook(metrics.StepMeter(model.name, progress.second_pass), is_cancelled, None,
                                           stop_early, stopped),
    }
    arguments |= _controlnet_arguments(task_spec("img2img"), request, hires.width, hires.height)
    with torch.inference_mode():
        images = pipeline(**arguments).images
    if is_cancelled():
        raise JobCancelled("cancelled")
    return images


def _decoded(pipeline: DiffusionPipeline, latents: torch.Tensor) -> list[Image.Image]:
    """First-pass latents as pictures, when a hires job was stopped before its second pass."""
    with torch.inference_mode():
        decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="pil")


class _Progress:
    """Steps as one count over both passes of a hires job (the second pass's total is known once it starts)."""

    def __init__(self, on_step: StepCallback, second: int):
        self.on_step = on_step
        self.expected_second = second
        self.first_total = 0

    def first(self, step: int, total: int) -> None:
        self.first_total = total
        self.on_step(step, total + self.expected_second)

    def second_pass(self, step: int, total: int) -> None:
        self.on_step(self.first_total + step, self.first_total + total)


def _step_hook(
    on_step: StepCallback, is_cancelled: Callable[[], bool], on_latents: LatentsCallback | None,
    stop_early: Callable[[], bool] | None = None, stopped: dict[str, int] | None = None,
) -> Callable[..., dict[str, Any]]:
    def step_end(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_latents is not None and "latents" in tensors:
            on_latents(step + 1, tensors["latents"])
        on_step(step + 1, pipe.num_timesteps)
        if is_cancelled():
            # Raising from the step hook stops at once; the interrupt flag would still run the remaining loop
            # and the VAE decode (a second or more on CPU) for an image nobody wants.
            raise JobCancelled("cancelled")
        if stop_early is not None and stopped is not None and stop_early():
            # Here the image so far is wanted: the pipeline's interrupt flag skips the remaining steps and
            # still decodes the latents.
            pipe._interrupt = True
            stopped.setdefault("step", step + 1)
        return tensors

    return step_end


def _controlnet_arguments(spec: TaskSpec, request: GenerationRequest, width: int, height: int) -> dict[str, Any]:
    """One ControlNet's arguments as values, several as lists (diffusers' multi-ControlNet)."""
    controls = request.controlnets
    if not controls:
        return {}
    images = [fit_image(control.image, width, height, "RGB") for control in controls]

    def each(values: list[Any]) -> Any:
        return values[0] if len(values) == 1 else values

    return {
        spec.control_image_argument: each(images),
        "controlnet_conditioning_scale": each([control.scale for control in controls]),
        "control_guidance_start": each([control.guidance_start for control in controls]),
        "control_guidance_end": each([control.guidance_end for control in controls]),
        "guess_mode": any(control.guess_mode for control in controls),
    }
