"""The AUTOMATIC1111 web UI API as its clients (webuiapi, ...) use it: schemas, translate-in, translate-out.

txt2img / img2img (with hires fix, ControlNet units of the sd-webui-controlnet extension, LoRA prompt tags), the
checkpoint option, progress / interrupt / skip, and the listings. `A1111State` is this server's A1111 settings
(the checkpoint chosen with POST /sdapi/v1/options): kept by the API layer, per process, in memory.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from api.compat import preprocessors
from api.compat.shared import A1111_SAMPLERS, build_body, resolve_model_alias, sampler_to_scheduler, split_lora_tags
from api.images import Base64Image, Base64ImageList, decode_image, encode_images
from api.schemas import GenerationBody, Img2ImgBody, InpaintingBody, Text2ImgBody
from api.serving import BatchRun
from models.errors import InvalidRequest, ModelNotFound
from models.registry import BASE_KINDS, RegistryEntry
from models.types import JobSnapshot

CONTROLNET_VERSION = 2
# A1111's hires upscalers -> ours. ESRGAN-style model upscalers do not exist here.
HIRES_UPSCALERS: dict[str, str] = {
    "Latent": "latent",
    "Latent (antialiased)": "latent-antialiased",
    "Latent (bicubic)": "latent-bicubic",
    "Latent (bicubic antialiased)": "latent-bicubic-antialiased",
    "Latent (nearest)": "latent-nearest",
    "Latent (nearest-exact)": "latent-nearest-exact",
    "Lanczos": "lanczos",
    "Nearest": "nearest",
    "None": "lanczos",  # A1111's "None" resizes the image without an upscaler model
}
CONTROL_MODES = {"0": False, "balanced": False, "2": True, "controlnet is more important": True}
_HASHED_TITLE = re.compile(r"^(?P<name>.+?)(?:\.(?:safetensors|ckpt|pt|pth|bin))?(?:\s*\[(?P<hash>[0-9a-fA-F]+)\])?$")


@dataclass
class A1111State:
    """What an A1111 server keeps between requests: its options (the checkpoint above all) and what runs now."""

    checkpoint: str | None = None  # registry name; None: the server's default model
    options: dict[str, Any] = field(default_factory=dict)  # other options clients set: echoed, not used
    runs: list[BatchRun] = field(default_factory=list)

    def run_of(self, job_id: str) -> BatchRun | None:
        return next((run for run in self.runs if run.job_id == job_id), None)


# -- schemas --------------------------------------------------------------------------------------------------------
class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    prompt: str = ""
    negative_prompt: str | None = None
    steps: int = 20
    # None: the model family's own (7 for SD 1.x, 1024x1024 and 5 for SDXL, ...), chosen by the engine.
    cfg_scale: float | None = None
    distilled_cfg_scale: float | None = None  # Forge's name for FLUX's guidance
    width: int | None = None
    height: int | None = None
    seed: int = -1
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1, le=100)
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    refiner_checkpoint: str | None = None  # SDXL refiner
    refiner_switch_at: float | None = None
    # Hires fix (txt2img).
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    denoising_strength: float | None = None


class Img2ImgRequest(Txt2ImgRequest):
    init_images: Base64ImageList = Field(min_length=1)
    mask: Base64Image | None = None
    denoising_strength: float | None = 0.75
    inpainting_mask_invert: int = 0


class ControlNetUnit(BaseModel):
    """One unit of the sd-webui-controlnet extension's API (alwayson_scripts.controlnet.args[i])."""

    model_config = ConfigDict(extra="ignore")

    enabled: bool = True
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    image: Any = None  # base64, or {"image": base64, "mask": ...}
    input_image: Any = None  # the older name of `image`
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: int | str = 0
    threshold_a: float | None = None
    threshold_b: float | None = None
    processor_res: int | None = None


class GenerationAnswer(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class PngInfoBody(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    image: Base64Image


class ControlNetDetectBody(BaseModel):
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)

    controlnet_module: str = "none"
    controlnet_input_images: list[Base64Image] = Field(default_factory=list)
    controlnet_images: list[Base64Image] = Field(default_factory=list)  # what webuiapi sends
    controlnet_threshold_a: float | None = None
    controlnet_threshold_b: float | None = None


# -- translate in ---------------------------------------------------------------------------------------------------
def txt2img_body(body: Txt2ImgRequest, entries: dict[str, RegistryEntry], state: A1111State) -> GenerationBody:
    if body.enable_hr:
        # The hires size scales the first pass's, which must be known here: A1111's own default, 512.
        body = body.model_copy(update={"width": body.width or 512, "height": body.height or 512})
    fields = _native_fields(body, entries, state) | {"controlnet": controlnet_units(body, entries, None) or None}
    if body.enable_hr:
        fields["hires"] = hires_fields(body)
    return build_body(Text2ImgBody, **fields)


def img2img_body(body: Img2ImgRequest, entries: dict[str, RegistryEntry], state: A1111State) -> GenerationBody:
    init = body.init_images[0]
    fields = _native_fields(body, entries, state) | {
        "image": init, "strength": body.denoising_strength,
        "controlnet": controlnet_units(body, entries, init) or None,
    }
    if body.mask is None:
        return build_body(Img2ImgBody, **fields)
    mask = body.mask.convert("L")
    if body.inpainting_mask_invert:
        mask = mask.point(lambda value: 255 - value)
    return build_body(InpaintingBody, mask_image=mask, **fields)


def _native_fields(body: Txt2ImgRequest, entries: dict[str, RegistryEntry], state: A1111State) -> dict[str, Any]:
    prompt, loras = split_lora_tags(body.prompt)
    checkpoint = _checkpoint(body.override_settings)
    return {
        "prompt": prompt or " ",
        "loras": loras or None,
        "negative_prompt": body.negative_prompt or None,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "seed": body.seed,
        "number_of_images": body.batch_size * body.n_iter,
        "scheduler": sampler_to_scheduler(body.sampler_name or body.sampler_index, body.scheduler),
        "model": resolve_checkpoint(entries, checkpoint) if checkpoint else state.checkpoint,
        "guidance": body.distilled_cfg_scale,
        "refiner": resolve_checkpoint(entries, body.refiner_checkpoint) if body.refiner_checkpoint else None,
        "refiner_switch_at": body.refiner_switch_at if body.refiner_checkpoint else None,
    }


def _checkpoint(override_settings: dict[str, Any]) -> str | None:
    checkpoint = override_settings.get("sd_model_checkpoint")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise RequestValidationError([{"loc": ("override_settings", "sd_model_checkpoint"), "type": "string_type",
                                       "msg": "must be a model name (a string)"}])
    return checkpoint


def hires_fields(body: Txt2ImgRequest) -> dict[str, Any]:
    """enable_hr's fields -> the native `hires`: the final size from hr_resize_x/y (one of them keeps the aspect
    ratio) or hr_scale, rounded down to multiples of 8 as A1111 does."""
    upscaler = HIRES_UPSCALERS.get(body.hr_upscaler or "Latent")
    if upscaler is None:
        raise InvalidRequest(f"hr_upscaler {body.hr_upscaler!r} does not exist here; upscalers: "
                             f"{', '.join(HIRES_UPSCALERS)}")
    if body.hr_resize_x or body.hr_resize_y:
        width = body.hr_resize_x or body.hr_resize_y * body.width / body.height
        height = body.hr_resize_y or body.hr_resize_x * body.height / body.width
    else:
        width, height = body.width * body.hr_scale, body.height * body.hr_scale
    return {"width": int(width) // 8 * 8, "height": int(height) // 8 * 8, "upscaler": upscaler,
            "steps": body.hr_second_pass_steps or None,
            "strength": body.denoising_strength if body.denoising_strength is not None else 0.7}


def controlnet_units(
    body: Txt2ImgRequest, entries: dict[str, RegistryEntry], init_image: Image.Image | None
) -> list[dict[str, Any]]:
    """alwayson_scripts.controlnet.args -> native ControlNets (each unit's image through its module). A unit
    without an image uses img2img's input image, as the extension does; disabled units and model "None" are
    skipped."""
    script = next((value for key, value in body.alwayson_scripts.items() if key.lower() == "controlnet"), None)
    args = script.get("args", []) if isinstance(script, dict) else []
    controls = []
    for index, raw in enumerate(args):
        if not isinstance(raw, dict):
            continue  # some clients send a bare False for "off"
        unit = ControlNetUnit.model_validate(raw)
        if not unit.enabled or unit.model in ("", "None", "none"):
            continue
        image = _unit_image(unit, index) or init_image
        if image is None:
            raise InvalidRequest(f"alwayson_scripts.controlnet.args[{index}]: no image; send the control image in "
                                 "`image` (txt2img has no input image to fall back on)")
        control_image = preprocessors.preprocess(unit.module, image, unit.threshold_a, unit.threshold_b)
        controls.append({"name": resolve_controlnet(entries, unit.model), "image": control_image,
                         "scale": unit.weight, "guidance_start": unit.guidance_start,
                         "guidance_end": unit.guidance_end, "guess_mode": _guess_mode(unit.control_mode, index)})
    return controls


def _unit_image(unit: ControlNetUnit, index: int) -> Image.Image | None:
    value = unit.image if unit.image not in (None, "") else unit.input_image
    if isinstance(value, dict):
        value = value.get("image")
    if value in (None, ""):
        return None
    try:
        return decode_image(value)
    except ValueError as error:
        raise InvalidRequest(f"alwayson_scripts.controlnet.args[{index}].image: {error}") from error


def _guess_mode(control_mode: int | str, index: int) -> bool:
    mode = str(control_mode).strip().lower()
    if mode not in CONTROL_MODES:
        raise InvalidRequest(f"alwayson_scripts.controlnet.args[{index}].control_mode {control_mode!r} is not "
                             "supported here; use Balanced (0) or ControlNet is more important (2)")
    return CONTROL_MODES[mode]


def _split_title(title: str) -> tuple[str, str | None]:
    match = _HASHED_TITLE.match(title.strip())
    assert match is not None  # the pattern matches any non-empty text
    return match.group("name").strip(), match.group("hash")


def resolve_checkpoint(entries: dict[str, RegistryEntry], title: str) -> str:
    """An A1111 checkpoint title ('name.safetensors [hash]', 'name [hash]', 'name', a hash) -> a registry base
    name; ModelNotFound (404 listing them) when none matches."""
    name, short_hash = _split_title(title)
    bases = {key: entry for key, entry in entries.items() if entry.kind in BASE_KINDS}
    resolved = resolve_model_alias(bases, name)
    if resolved in bases:
        return resolved
    wanted = (short_hash or name).lower()
    for key, entry in bases.items():
        if entry.sha256 and entry.sha256.lower().startswith(wanted) and len(wanted) >= 8:
            return key
    raise ModelNotFound(title, sorted(bases))


def resolve_controlnet(entries: dict[str, RegistryEntry], title: str) -> str:
    """'control_v11p_sd15_canny [d14c016b]' -> its registry name; other names pass through (a ControlNet loaded
    with /load-controlnet/, or the engine's 404 listing the known ones)."""
    name, _ = _split_title(title)
    return name


def a1111_title(name: str, entry: RegistryEntry) -> str:
    return f"{name} [{entry.sha256[:10]}]" if entry.sha256 else name


# -- translate out --------------------------------------------------------------------------------------------------
def generation_answer(body: Txt2ImgRequest, jobs: list[JobSnapshot], images: list[str]) -> GenerationAnswer:
    """The answer of one request run as one job per iteration (n_iter)."""
    results = [job.result for job in jobs if job.result is not None]
    first = results[0]
    seeds = [seed for result in results for seed in result.seeds]
    negative = body.negative_prompt or ""
    width, height = first.first_pass_size or (first.width, first.height)
    info = {
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(seeds), "negative_prompt": negative,
        "all_negative_prompts": [negative] * len(seeds), "seed": seeds[0], "all_seeds": seeds,
        "subseed": seeds[0], "all_subseeds": seeds, "subseed_strength": 0, "width": width, "height": height,
        "sampler_name": body.sampler_name or first.scheduler, "cfg_scale": first.guidance_scale,
        "steps": first.steps, "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.model, "sd_model_hash": (first.model_sha256 or "")[:10] or None,
        "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": first.hires.strength if first.hires else first.strength,
        "extra_generation_params": _extra_parameters(first), "index_of_first_image": 0,
        "infotexts": [infotext(body, result, index) for result in results for index in range(len(result.seeds))],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": "sdserve",
        "interrupted": any(result.stopped_at_step is not None for result in results),
    }
    parameters = body.model_dump(exclude={"init_images", "mask"})
    return GenerationAnswer(images=images, parameters=parameters, info=json.dumps(info))


def _extra_parameters(result: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if result.hires is not None:
        upscaler = next((name for name, ours in HIRES_UPSCALERS.items() if ours == result.hires.upscaler),
                        result.hires.upscaler)
        extra |= {"Hires resize": f"{result.width}x{result.height}", "Hires upscaler": upscaler,
                  "Hires steps": result.hires.steps or result.steps}
    for index, control in enumerate(result.controlnets):
        extra[f"ControlNet {index}"] = (f"Model: {control.name}, Weight: {control.scale}, Guidance Start: "
                                        f"{control.guidance_start}, Guidance End: {control.guidance_end}")
    return extra


def infotext(body: Txt2ImgRequest, result: Any, index: int) -> str:
    """A1111's text for one image: the prompt as given (with its <lora:...> tags), then the parameters."""
    lines = [body.prompt]
    if body.negative_prompt:
        lines.append(f"Negative prompt: {body.negative_prompt}")
    width, height = result.first_pass_size or (result.width, result.height)
    fields: list[tuple[str, Any]] = [
        ("Steps", result.steps), ("Sampler", body.sampler_name or result.scheduler),
        ("CFG scale", result.guidance_scale), ("Seed", result.seeds[index]), ("Size", f"{width}x{height}"),
    ]
    if result.model_sha256:
        fields.append(("Model hash", result.model_sha256[:10]))
    fields.append(("Model", result.model))
    strength = result.hires.strength if result.hires else result.strength
    if strength is not None:
        fields.append(("Denoising strength", strength))
    fields += list(_extra_parameters(result).items())
    if result.stopped_at_step is not None:
        fields.append(("Interrupted at step", result.stopped_at_step))
    fields.append(("Version", "sdserve"))
    lines.append(", ".join(f"{name}: {_quoted(value)}" for name, value in fields))
    return "\n".join(lines)


def _quoted(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if "," in text or ":" in text else text


def encode_jobs(jobs: list[JobSnapshot]) -> list[str]:
    return [text for job in jobs if job.result for text in encode_images(job.result.images, "png")]


def sd_models(entries: dict[str, RegistryEntry]) -> list[dict[str, Any]]:
    return [
        {"title": a1111_title(name, entry), "model_name": name, "hash": (entry.sha256 or "")[:10] or None,
         "sha256": entry.sha256, "filename": entry.source, "config": None, "family": entry.family}
        for name, entry in sorted(entries.items()) if entry.kind in BASE_KINDS
    ]


def options(state: A1111State, entries: dict[str, RegistryEntry], default_model: str) -> dict[str, Any]:
    name = state.checkpoint or default_model
    entry = entries.get(name)
    title = a1111_title(name, entry) if entry else name
    return state.options | {"sd_model_checkpoint": title, "sd_checkpoint_hash": entry.sha256 if entry else None,
                            "samples_format": "png"}


def set_options(state: A1111State, entries: dict[str, RegistryEntry], changes: dict[str, Any]) -> None:
    """sd_model_checkpoint switches the model A1111 clients get (404 when unknown, nothing changed); other
    options are kept and echoed by GET /options but change nothing here."""
    checkpoint = changes.get("sd_model_checkpoint")
    if checkpoint:
        state.checkpoint = resolve_checkpoint(entries, str(checkpoint))
    state.options |= {key: value for key, value in changes.items() if key != "sd_model_checkpoint"}


def loras(entries: dict[str, RegistryEntry]) -> list[dict[str, Any]]:
    return [
        {"name": name, "alias": name, "path": entry.source,
         "metadata": {"base": entry.base, "trigger_words": entry.trigger_words}}
        for name, entry in sorted(entries.items()) if entry.kind == "lora"
    ]


def samplers() -> list[dict[str, Any]]:
    return [{"name": name, "aliases": [scheduler], "options": {}} for name, scheduler in A1111_SAMPLERS.items()]


def schedulers() -> list[dict[str, Any]]:
    """The schedule types (A1111 1.9+): the sampler's own, or Karras sigmas where the sampler has a Karras form."""
    return [
        {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
        {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
    ]


def upscalers() -> list[dict[str, Any]]:
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in ("None", "Lanczos", "Nearest")]


def latent_upscale_modes() -> list[dict[str, str]]:
    return [{"name": name} for name in HIRES_UPSCALERS if name.startswith("Latent")]


def png_info(image: Image.Image) -> dict[str, Any]:
    """A1111's /png-info: the `parameters` text of a PNG, its other text chunks, and the text parsed."""
    text = {key: value for key, value in image.info.items() if isinstance(value, str)}  # PNG text chunks
    geninfo = text.pop("parameters", "")
    return {"info": geninfo, "items": text, "parameters": parse_infotext(geninfo) if geninfo else {}}


def parse_infotext(text: str) -> dict[str, Any]:
    lines = text.strip().split("\n")
    last = lines[-1] if len(lines) > 1 and re.search(r"\w+: ", lines[-1]) else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line.removeprefix("Negative prompt:").strip()
        (negative if in_negative else prompt).append(line)
    parsed: dict[str, Any] = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)', last):
        parsed[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return parsed


def controlnet_models(entries: dict[str, RegistryEntry], loaded: list[str]) -> dict[str, list[str]]:
    names = [a1111_title(name, entry) for name, entry in sorted(entries.items()) if entry.kind == "controlnet"]
    return {"model_list": names + [name for name in loaded if name not in entries]}


def controlnet_modules() -> dict[str, Any]:
    detail = {name: {"model_free": False, "sliders": []} for name in preprocessors.PREPROCESSORS}
    detail["canny"]["sliders"] = [{"name": "Low Threshold", "value": 100, "min": 1, "max": 255},
                                  {"name": "High Threshold", "value": 200, "min": 1, "max": 255}]
    return {"module_list": list(preprocessors.PREPROCESSORS), "module_detail": detail}


def controlnet_detect(body: ControlNetDetectBody) -> dict[str, Any]:
    images = body.controlnet_input_images or body.controlnet_images
    if not images:
        raise InvalidRequest("controlnet_input_images: send at least one image")
    results = [preprocessors.preprocess(body.controlnet_module, image, body.controlnet_threshold_a,
                                        body.controlnet_threshold_b) for image in images]
    return {"images": encode_images(results, "png"), "info": "Success"}


def progress(job: JobSnapshot | None, waiting: int) -> dict[str, Any]:
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "job": "", "job_count": waiting,
                          "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
    fraction = job.step / job.total_steps if job.total_steps else 0.0
    return {"progress": round(fraction, 4), "eta_relative": 0.0, "current_image": None, "textinfo": None,
            "state": {"skipped": False, "interrupted": job.cancel_requested, "job": job.id,
                      "job_count": waiting + 1, "job_timestamp": "0", "job_no": 0, "sampling_step": job.step,
                      "sampling_steps": job.total_steps}}


def memory(stats: dict[str, Any]) -> dict[str, Any]:
    """A1111's /memory from the engine's system stats: RAM in bytes, CUDA in bytes (or why there is none)."""
    ram = stats.get("cpu_ram", {})
    answer: dict[str, Any] = {"ram": {"free": ram.get("available"), "used": ram.get("used"),
                                      "total": ram.get("total")}}
    gpus = stats.get("gpu") or []
    if gpus:
        gpu = gpus[0]
        mib = 2**20
        answer["cuda"] = {"system": {"free": gpu["memoryFree"] * mib, "used": gpu["memoryUsed"] * mib,
                                     "total": gpu["memoryTotal"] * mib}}
    else:
        answer["cuda"] = {"error": "no CUDA device on this server"}
    return answer
