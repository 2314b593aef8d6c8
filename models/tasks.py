"""The task table: each generation task once, with what it needs and how its pipeline call is built.

Validation (which inputs a request must carry), the pipeline cache (which pipeline class a task runs on, derived
from the loaded base with `from_pipe`, with or without a ControlNet) and the engine (the arguments of the call)
all read this table. Adding a task is adding a row here, a `Task` name in models/types.py and a route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from PIL import Image

from models.errors import InvalidRequest
from models.types import GenerationRequest, Task


@dataclass(frozen=True)
class TaskSpec:
    name: Task
    # AutoPipeline class whose from_pipe picks the family's pipeline (and its ControlNet variant) for this task.
    pipeline_class: type
    needs_image: bool
    needs_mask: bool
    default_strength: float | None  # None: the task has no strength
    # The argument that takes a ControlNet's conditioning image: text2img pipelines call it `image`, the others
    # already use `image` for the picture they start from.
    control_image_argument: str

    def check_inputs(self, request: GenerationRequest) -> list[str]:
        """What the request lacks for this task, as sentences for a 422."""
        problems = []
        if self.needs_image and request.image is None:
            problems.append(f"{self.name} needs an input image")
        if self.needs_mask and request.mask_image is None:
            problems.append(f"{self.name} needs a mask_image (white = repaint, black = keep)")
        return problems

    def strength(self, request: GenerationRequest) -> float | None:
        if self.default_strength is None:
            return None
        return request.strength if request.strength is not None else self.default_strength

    def image_arguments(
        self, request: GenerationRequest, width: int, height: int, img2img_takes_size: bool = False
    ) -> dict[str, Any]:
        """The task's own pipeline arguments: output size, input picture and mask, strength. Some families' img2img
        pipelines (SD 3.x, FLUX) size their output themselves rather than from the input: they get the size too."""
        if not self.needs_image:
            return {"width": width, "height": height}
        arguments: dict[str, Any] = {
            "image": fit_image(request.image, width, height, "RGB"),
            "strength": self.strength(request),
        }
        if img2img_takes_size:
            arguments |= {"width": width, "height": height}
        if self.needs_mask:
            arguments |= {"mask_image": fit_image(request.mask_image, width, height, "L"),
                          "width": width, "height": height}
        return arguments


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("text2img", AutoPipelineForText2Image, needs_image=False, needs_mask=False,
                 default_strength=None, control_image_argument="image"),
        TaskSpec("img2img", AutoPipelineForImage2Image, needs_image=True, needs_mask=False,
                 default_strength=0.75, control_image_argument="control_image"),
        TaskSpec("inpainting", AutoPipelineForInpainting, needs_image=True, needs_mask=True,
                 default_strength=1.0, control_image_argument="control_image"),
    )
}


def task_spec(task: str) -> TaskSpec:
    spec = TASKS.get(task)
    if spec is None:
        raise InvalidRequest(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    return spec


def fit_image(image: Image.Image | None, width: int, height: int, mode: str) -> Image.Image:
    """The picture in `mode` at the output size (LANCZOS when it must be resized)."""
    if image is None:
        raise InvalidRequest("an input image is required")
    image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image
