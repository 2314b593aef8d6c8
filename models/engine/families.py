"""The engine's side of the family table (models/families.py): a loaded pipeline's family and native size, the
checks a request must pass on a model of a family, and the family's own pipeline arguments. Runs on the worker
thread (the checks also on the submitting thread)."""

from __future__ import annotations

from typing import Any

from diffusers import DiffusionPipeline

from models.engine.schedulers import scheduler_problem
from models.errors import InvalidRequest, ModelUnavailable
from models.families import DEFAULT_REFINER_SWITCH, FAMILIES, Family, family_named, family_of_model_index
from models.types import GenerationRequest

# Family arguments passed to the pipeline under the same name; the refiner's are handled by generate().
_PIPELINE_ARGUMENTS = ("prompt_2", "negative_prompt_2", "prompt_3", "negative_prompt_3", "original_size",
                       "target_size", "crops_coords_top_left")


def family_of_pipeline(pipeline: DiffusionPipeline, given: str | None = None) -> Family:
    """The family of a loaded pipeline: the registry's word for it when given, else its class and components."""
    if given is not None:
        return family_named(given)
    index = {"_class_name": type(pipeline).__name__, **dict(pipeline.config)}
    if type(pipeline).__name__ == "StableDiffusionXLImg2ImgPipeline":
        index["text_encoder"] = None if getattr(pipeline, "text_encoder", None) is None else ["transformers", "x"]
    name = family_of_model_index(index)
    if name is None:
        known = ", ".join(sorted({cls for family in FAMILIES.values() for cls in family.pipeline_classes}))
        raise ModelUnavailable(f"{type(pipeline).__name__} is not a pipeline this server serves; it serves {known}")
    return family_named(name)


def native_size(pipeline: DiffusionPipeline) -> int:
    """The size a model was trained at: its denoiser's sample size in pixels (FLUX transformers do not record one;
    their pipelines assume 1024)."""
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    sample_size = denoiser.config.get("sample_size") if denoiser is not None else None
    if not isinstance(sample_size, int):
        sample_size = getattr(pipeline, "default_sample_size", 128)
    return int(sample_size * pipeline.vae_scale_factor)


def check_for_family(request: GenerationRequest, family: Family, model: str) -> None:
    """Refuse (422) what does not apply to `model`'s family: its fields, size multiple, scheduler, adapters."""
    problems = family.problems(request, model)
    scheduler = scheduler_problem(request.scheduler, family, model)
    if scheduler:
        problems.append(scheduler)
    if problems:
        raise InvalidRequest("; ".join(problems))


def check_refiner(refiner: str, base: str, refiner_family: Family | None) -> None:
    """A refiner must be an SDXL refiner (or an SDXL base, which refines too) other than the base itself;
    `refiner_family` None: not known before it is loaded."""
    if refiner == base:
        raise InvalidRequest(f"refiner {refiner!r} is the base model itself")
    if refiner_family is not None and refiner_family.name not in ("sdxl-refiner", "sdxl"):
        raise InvalidRequest(f"refiner {refiner!r} is a {refiner_family.label} model; a refiner must be an SDXL "
                             "refiner (or SDXL) model")


def family_arguments(request: GenerationRequest) -> dict[str, Any]:
    """The family arguments a request gave, as the pipelines take them (sizes as tuples)."""
    return {name: getattr(request, name) for name in _PIPELINE_ARGUMENTS if getattr(request, name) is not None}


def refiner_switch(request: GenerationRequest) -> float:
    return request.refiner_switch_at if request.refiner_switch_at is not None else DEFAULT_REFINER_SWITCH
