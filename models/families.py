"""The model families, each once: what a Stable Diffusion 1.x, SDXL, SDXL refiner, SD 3.x or FLUX model is, what it
takes and what this server does with it.

The engine learns the family of a base once (from its registry entry, its files or its loaded pipeline) and every
part reads this table: which pipeline class loads a single-file checkpoint, which request fields mean something,
which schedulers work, the native size and default guidance, what LoRAs, ControlNets and training support. Plain
data: nothing here imports torch, so the registry and the API's clients can read family names without loading a
model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from models.registry.entries import FamilyName
from models.types import TASK_NAMES, GenerationRequest, Task

# Request fields that only some families use (GenerationRequest attribute names). A family's `arguments` says
# which of them it takes; any other one given is refused with a 422 naming it.
FAMILY_ARGUMENTS: tuple[str, ...] = (
    "prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3", "original_size", "target_size",
    "crops_coords_top_left", "guidance", "refiner", "refiner_switch_at",
)
_SDXL_SIZE = frozenset({"original_size", "target_size", "crops_coords_top_left"})
DEFAULT_REFINER_SWITCH = 0.8  # the fraction of the steps an SDXL base runs before its refiner takes over


@dataclass(frozen=True)
class Family:
    name: FamilyName
    label: str  # as people say it
    pipeline_classes: tuple[str, ...]  # diffusers pipeline classes (model_index.json `_class_name`) of this family
    single_file_class: str  # the pipeline class whose from_single_file loads a checkpoint of this family
    tasks: tuple[Task, ...]
    default_guidance: float  # the guidance a request that gives none runs with
    negative_prompt: bool
    arguments: frozenset[str]  # which FAMILY_ARGUMENTS it takes
    flow_matching: bool  # flow-matching models take flow-matching schedulers only (models/engine/schedulers.py)
    size_multiple: int  # width and height must be multiples of this (VAE factor x transformer patch)
    img2img_takes_size: bool  # its img2img pipeline sizes the output itself (else the input image's size)
    packed_latents: bool  # latents are 2x2 patches packed into tokens (FLUX): previews unpack them first
    lora_layouts: tuple[str, ...]  # LoRA key layouts diffusers loads for it; () when LoRAs are refused
    controlnet: bool  # ControlNets (ControlNetModel) served with it
    training: bool  # training/ scripts accept it as a base

    def problems(self, request: GenerationRequest, model: str) -> list[str]:
        """What in `request` does not apply to this family, as sentences for a 422 naming the field and the
        family. Schedulers are checked by the engine, which knows their classes."""
        shown = f"model {model!r} ({self.label})"
        problems = []
        if request.task not in self.tasks:
            problems.append(f"{shown} does not do {request.task}; it does {', '.join(self.tasks)}"
                            + (": name it as `refiner` of an SDXL request" if self.name == "sdxl-refiner" else ""))
        if not self.negative_prompt:
            problems += [f"{field}: {shown} has no negative prompt (it runs without classifier-free guidance)"
                         for field in ("negative_prompt", "negative_prompt_2", "negative_prompt_3")
                         if getattr(request, field)]
        for field in FAMILY_ARGUMENTS:
            if getattr(request, field) is not None and field not in self.arguments and not (
                field.startswith("negative") and not self.negative_prompt
            ):
                takers = ", ".join(family.label for family in FAMILIES.values() if field in family.arguments)
                problems.append(f"{field} does not apply to {shown}; it is for {takers} models")
        for side in ("width", "height"):
            value = getattr(request, side)
            if value is not None and value % self.size_multiple:
                problems.append(f"{side} {value} is not a multiple of {self.size_multiple}, which {shown} needs")
        hires = request.hires
        if hires is not None:
            if hires.width % self.size_multiple or hires.height % self.size_multiple:
                problems.append(f"hires size {hires.width}x{hires.height} is not a multiple of {self.size_multiple}, "
                                f"which {shown} needs")
            if self.packed_latents and hires.upscaler.startswith("latent"):
                problems.append(f"hires upscaler {hires.upscaler!r}: {shown} packs its latents into tokens, which "
                                "latent upscalers cannot resize; use lanczos or nearest")
            if request.refiner is not None:
                problems.append("refiner and hires cannot be combined: send one of them")
        if request.refiner_switch_at is not None and request.refiner is None:
            problems.append("refiner_switch_at needs a refiner (the registry name of an SDXL refiner)")
        if request.refiner is not None and request.controlnet is not None:
            problems.append("refiner and controlnet cannot be combined: the ControlNet pipelines do not hand their "
                            "last steps to another model")
        if request.loras and not self.lora_layouts:
            problems.append(f"loras: {shown} does not take LoRAs here")
        if request.controlnet is not None and not self.controlnet:
            problems.append(f"controlnet: {shown} does not take ControlNets here (SD 1.x and SDXL bases do)")
        return problems

    def guidance_for(self, request: GenerationRequest, model_default: float | None = None) -> float:
        """FLUX's distilled guidance (`guidance`, else cfg_scale, which FLUX has no other use for); other
        families' classifier-free guidance. When the request gives none: the model's own default (its registry
        entry's `guidance`), else the family's."""
        if self.name == "flux" and request.guidance is not None:
            return request.guidance
        if request.guidance_scale is not None:
            return request.guidance_scale
        return model_default if model_default is not None else self.default_guidance


_CLIP_PROMPTS = frozenset({"prompt_2", "negative_prompt_2"})
FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "sd", "Stable Diffusion 1.x/2.x",
            ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
            "StableDiffusionPipeline", TASK_NAMES, default_guidance=7.0, negative_prompt=True,
            arguments=frozenset(), flow_matching=False, size_multiple=8, img2img_takes_size=False,
            packed_latents=False, lora_layouts=("diffusers", "kohya"), controlnet=True, training=True,
        ),
        Family(
            "sdxl", "SDXL",
            ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
            "StableDiffusionXLPipeline", TASK_NAMES, default_guidance=5.0, negative_prompt=True,
            arguments=_CLIP_PROMPTS | _SDXL_SIZE | {"refiner", "refiner_switch_at"}, flow_matching=False,
            size_multiple=8, img2img_takes_size=False, packed_latents=False, lora_layouts=("diffusers", "kohya"),
            controlnet=True, training=True,
        ),
        Family(
            # An SDXL img2img pipeline without the first text encoder, conditioned on an aesthetic score.
            "sdxl-refiner", "SDXL refiner", ("StableDiffusionXLImg2ImgPipeline",),
            "StableDiffusionXLImg2ImgPipeline", ("img2img", "inpainting"), default_guidance=5.0,
            negative_prompt=True, arguments=_CLIP_PROMPTS | _SDXL_SIZE, flow_matching=False, size_multiple=8,
            img2img_takes_size=False, packed_latents=False, lora_layouts=(), controlnet=False, training=False,
        ),
        Family(
            "sd3", "SD 3.x",
            ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
            "StableDiffusion3Pipeline", TASK_NAMES, default_guidance=7.0, negative_prompt=True,
            arguments=_CLIP_PROMPTS | {"prompt_3", "negative_prompt_3"}, flow_matching=True, size_multiple=16,
            img2img_takes_size=True, packed_latents=False, lora_layouts=("diffusers",), controlnet=False,
            training=False,
        ),
        Family(
            "flux", "FLUX", ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"), "FluxPipeline",
            TASK_NAMES, default_guidance=3.5, negative_prompt=False, arguments=frozenset({"prompt_2", "guidance"}),
            flow_matching=True, size_multiple=16, img2img_takes_size=True, packed_latents=True,
            lora_layouts=("diffusers", "kohya"), controlnet=False, training=False,
        ),
    )
}


def family_named(name: str) -> Family:
    return FAMILIES[name]


def family_of_model_index(index: dict[str, Any]) -> FamilyName | None:
    """The family a diffusers folder's model_index.json describes; None for pipelines this server does not know.
    An SDXL img2img pipeline without its first text encoder is a refiner."""
    class_name = index.get("_class_name")
    if class_name == "StableDiffusionXLImg2ImgPipeline":
        text_encoder = index.get("text_encoder")
        lacks_first_encoder = not text_encoder or text_encoder == [None, None]
        return "sdxl-refiner" if lacks_first_encoder or index.get("requires_aesthetics_score") else "sdxl"
    return next((family.name for family in FAMILIES.values() if class_name in family.pipeline_classes), None)


def family_of_model_index_text(text: str) -> FamilyName | None:
    try:
        index = json.loads(text)
    except ValueError:
        return None
    return family_of_model_index(index) if isinstance(index, dict) else None


def family_of_checkpoint_keys(keys: set[str]) -> FamilyName | None:
    """The family of a single-file checkpoint in the original (non-diffusers) layout, from its tensor names: FLUX's
    double-stream blocks, SD 3's joint blocks, SDXL's two text embedders (a refiner has only the OpenCLIP one),
    SD 1.x/2.x's UNet and text encoder."""

    def has(fragment: str) -> bool:
        return any(fragment in key for key in keys)

    if has("double_blocks.") and has("img_attn."):
        return "flux"
    if has("joint_blocks.") and has("context_block."):
        return "sd3"
    if has("conditioner.embedders.1."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        return "sdxl-refiner"
    if has("model.diffusion_model.input_blocks.") or has("cond_stage_model."):
        return "sd"
    return None
