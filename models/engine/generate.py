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
from models.engine.families import check_for_family, family_arguments, refiner_switch
from models.engine.loras import with_trigger_words
from models.engine.pipelines import LoadedModel
from models.engine.schedulers import make_scheduler, scheduler_names
from models.errors import InvalidRequest, JobCancelled
from models.families import FAMILY_ARGUMENTS, Family
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
    problems += _check_controlnets_and_hires(request, settings)
    strength = spec.strength(request)
    if strength is not None and int(request.steps * strength) < 1:
        problems.append(f"strength {strength} with {request.steps} steps runs no denoising step; "
                        "raise strength or steps so that strength x steps >= 1")
    if problems:
        raise InvalidRequest("; ".join(problems))


MIN_SIDE = 64


def size_from_image(request: GenerationRequest, multiple: int = 8) -> tuple[int, int] | None:
    """The output size of a request with an input image: each side as asked, else the image's own (down to the
    family's multiple: 8, or 16 for SD 3.x and FLUX). None without an input image (the model's native size fills
    in what is missing)."""
    if request.image is None:
        return None
    image_width, image_height = request.image.size
    return (request.width or image_width - image_width % multiple,
            request.height or image_height - image_height % multiple)


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
    inputs = [request.image, request.mask_image, *(control.image for control in request.controlnets)]
    pixels = sum(image.width * image.height for image in inputs if image is not None)
    if pixels > settings.max_input_pixels:
        problems.append(f"the input images hold {pixels} pixels together; at most {settings.max_input_pixels} "
                        "(SDSERVE_MAX_INPUT_PIXELS)")
    return problems


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
    """Explicit size, else the input image's size (down to the family's multiple: 8, or 16 for SD 3.x and FLUX),
    else the model's native size."""
    resolved = size_from_image(request, model.family.size_multiple)
    if resolved is not None:
        return resolved
    native_width, native_height = model.default_size()
    return request.width or native_width, request.height or native_height


Refiner = tuple[DiffusionPipeline, LoadedModel]


def batch_key(request: GenerationRequest, model: str) -> tuple[Any, ...] | None:
    """Requests with equal keys can share one pipeline call (micro-batching): the same model, task, size, steps,
    scheduler, guidance, strength and LoRAs at the same scales. Prompts, negative prompts, seeds, image counts and
    input images may differ. None: the request runs alone (ControlNets' conditioning images and a hires fix's
    second pass are per call, and so are a model family's own arguments, a refiner above all)."""
    if request.controlnets or request.hires is not None:
        return None
    if any(getattr(request, name) is not None for name in FAMILY_ARGUMENTS):
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
    refiner: Refiner | None = None,
) -> GenerationResult:
    """Run one request (its seed already drawn) on `pipeline`, a pipeline of `model` for the request's task."""
    return generate_batch(pipeline, model, [request], on_step, is_cancelled, on_latents, refiner=refiner)[0]


def generate_batch(
    pipeline: DiffusionPipeline,
    model: LoadedModel,
    requests: list[GenerationRequest],
    on_step: StepCallback,
    is_cancelled: Callable[[], bool],
    on_latents: LatentsCallback | None = None,
    second_pipeline: DiffusionPipeline | None = None,
    stop_early: Callable[[], bool] | None = None,
    refiner: Refiner | None = None,
) -> list[GenerationResult]:
    """Run requests with one batch key in one pipeline call: one entry (prompt, generator, input image) per image,
    so each image starts from its own seed's noise; `on_latents` gets every image's latents, in request order.
    A lone request may carry a hires fix, whose img2img second pass runs on `second_pipeline`, or an SDXL
    `refiner` (its pipeline for the task and its model) that runs the last steps. `stop_early` asks to finish at
    the next step with the images so far (A1111's interrupt)."""
    # 1. What the requests resolve to on this model and its family: the same size, scheduler, guidance and LoRAs
    #    for all (their key).
    started = time.perf_counter()
    first = requests[0]
    spec = task_spec(first.task)
    family = model.family
    for request in requests:
        check_for_family(request, family, model.name)
    if any(request.seed is None for request in requests):
        raise ValueError("the engine draws the seed before a request runs")
    width, height = resolve_size(first, model)
    seeds = [[request.seed + index for index in range(request.num_images)] for request in requests]  # type: ignore[operator]
    counts = [request.num_images for request in requests]
    hires = first.hires if len(requests) == 1 else None
    guidance = family.guidance_for(first, model.entry.guidance)
    # 2. A scheduler of its own (never one shared with an earlier run) and exactly the requests' LoRAs.
    pipeline.scheduler = make_scheduler(first.scheduler, model.scheduler_config, family)
    loras = model.loras.activate(first.loras)
    prompts = [with_trigger_words(request.prompt, loras) for request in requests]
    # 3. The call: CPU generators give the same starting noise on every device, so a seed reproduces anywhere.
    progress = _Progress(on_step, second=hires_steps.expected_second_pass_steps(hires, first.steps) if hires else 0)
    stopped: dict[str, int] = {}
    if on_latents is not None and family.packed_latents:
        on_latents = _unpacking(on_latents, pipeline, width, height)
    negatives = [request.negative_prompt or "" for request in requests]
    all_seeds = [seed for request_seeds in seeds for seed in request_seeds]
    common: dict[str, Any] = {
        "prompt": _per_image(prompts, counts),
        "guidance_scale": guidance,
        "num_images_per_prompt": 1,
    }
    if family.negative_prompt:
        common["negative_prompt"] = _per_image(negatives, counts) if any(negatives) else None
    # A family's own arguments come with a request that runs alone: its extra prompts, one per image like `prompt`.
    common |= {name: _per_image([value], counts) if isinstance(value, str) else value
               for name, value in family_arguments(first).items()}
    meter = metrics.StepMeter(model.name, progress.first)
    arguments: dict[str, Any] = common | {
        "num_inference_steps": first.steps,
        "generator": _generators(all_seeds),
        "callback_on_step_end": _step_hook(meter, is_cancelled, on_latents, stop_early, stopped),
    }
    per_request = [spec.image_arguments(request, width, height, family.img2img_takes_size) for request in requests]
    for name, value in per_request[0].items():
        arguments[name] = _per_image([each[name] for each in per_request], counts) if name in _PER_IMAGE else value
    if len(requests) == 1:
        arguments |= _controlnet_arguments(spec, first, width, height)
    if hires is not None and hires_steps.is_latent(hires):
        arguments["output_type"] = "latent"
    family_used = family_arguments(first) | ({"guidance": guidance} if first.guidance is not None else {})
    with torch.inference_mode():
        if refiner is None:
            images = pipeline(**arguments).images
        else:
            switch = refiner_switch(first)
            images = _refined(pipeline, arguments, refiner, first, switch, meter, is_cancelled, on_latents,
                              stop_early, stopped)
            family_used |= {"refiner": refiner[1].name, "refiner_switch_at": switch}
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
                                  stop_early, stopped, family)
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
                               stopped_at_step=stopped.get("step"), family=family.name,
                               family_arguments=family_used))
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
        guidance_scale=model.family.guidance_for(request, model.entry.guidance),
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
    stop_early: Callable[[], bool] | None, stopped: dict[str, int], family: Family,
) -> list[Image.Image]:
    """Hires fix's img2img pass on the upscaled first pass, with the same seeds (as A1111 does)."""
    hires = request.hires
    assert hires is not None
    pipeline.scheduler = make_scheduler(request.scheduler, model.scheduler_config, family)
    size = {"width": hires.width, "height": hires.height} if family.img2img_takes_size else {}
    arguments = common | size | {
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
    """First-pass latents as pictures, when a hires job (or a refined one) was stopped before its second pass.
    SD 3's VAE shifts its latents as well as scaling them."""
    config = pipeline.vae.config
    with torch.inference_mode():
        unscaled = latents / config.scaling_factor + (config.get("shift_factor") or 0.0)
        decoded = pipeline.vae.decode(unscaled.to(pipeline.vae.dtype), return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="pil")


def _refined(
    pipeline: DiffusionPipeline, arguments: dict[str, Any], refiner: Refiner, request: GenerationRequest,
    switch: float, on_step: StepCallback, is_cancelled: Callable[[], bool], on_latents: LatentsCallback | None,
    stop_early: Callable[[], bool] | None, stopped: dict[str, int],
) -> list[Image.Image]:
    """SDXL's ensemble of experts: the base denoises down to `switch` and hands its latents over; the refiner
    (an img2img or inpainting pipeline) starts there and finishes. Steps count on from the base's. Asked to stop
    early during the base's steps, the base's latents are decoded and the refiner does not run."""
    refiner_pipeline, refiner_model = refiner
    expected_rest = max(1, round(request.steps * (1 - switch)))
    base_hook = _step_hook(lambda step, total: on_step(step, total + expected_rest), is_cancelled, on_latents,
                           stop_early, stopped)
    latents = pipeline(**arguments | {"denoising_end": switch, "output_type": "latent",
                                      "callback_on_step_end": base_hook}).images
    if is_cancelled():
        raise JobCancelled("cancelled")
    if stopped:
        return _decoded(pipeline, latents)
    done = pipeline.num_timesteps
    refiner_pipeline.scheduler = make_scheduler(request.scheduler, refiner_model.scheduler_config,
                                                refiner_model.family)
    refiner_arguments = {
        key: value for key, value in arguments.items()
        if key not in ("width", "height", "callback_on_step_end", "generator", "image", "strength")
    }
    if not refiner_model.family.negative_prompt:
        refiner_arguments.pop("negative_prompt", None)
    refiner_arguments |= {
        "image": latents,
        "denoising_start": switch,
        "generator": _generators([generator.initial_seed() for generator in arguments["generator"]]),
        "callback_on_step_end": _step_hook(lambda step, total: on_step(done + step, done + total), is_cancelled,
                                           on_latents, stop_early, stopped),
    }
    if "mask_image" in arguments:
        refiner_arguments |= {"mask_image": arguments["mask_image"], "width": arguments["width"],
                              "height": arguments["height"]}
    return refiner_pipeline(**refiner_arguments).images


def _unpacking(on_latents: LatentsCallback, pipeline: DiffusionPipeline, width: int, height: int) -> LatentsCallback:
    """FLUX pipelines pack 2x2 latent patches into tokens: unpack them to (batch, channels, h, w) for previews."""

    def unpacked(step: int, latents: torch.Tensor) -> None:
        if latents.ndim == 3:
            latents = type(pipeline)._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
        on_latents(step, latents)

    return unpacked


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
