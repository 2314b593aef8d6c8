"""Saved images: PNG files that carry their own generation parameters.

Each PNG has two text chunks:
- `parameters`: the AUTOMATIC1111 text ("prompt\\nNegative prompt: ...\\nSteps: N, Sampler: ..., CFG scale: ...,
  Seed: ..., Size: WxH, Model: ..."), which image viewers, civitai and A1111's "PNG info" tab read;
- `sdserve`: JSON whose `request` is the native API body that makes this image again (POST it to /jobs, or to
  /text2img etc. without `task`); img2img and inpainting inputs are not embedded, only their digests.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from models.types import GenerationRequest, GenerationResult

PARAMETERS_CHUNK = "parameters"
SDSERVE_CHUNK = "sdserve"
METADATA_VERSION = 1


@dataclass(frozen=True)
class SavedImage:
    path: Path
    sha256: str
    size_bytes: int


def reproduction_body(task: str, result: GenerationResult, index: int) -> dict[str, Any]:
    """The native API request that makes image `index` of `result` alone (its own seed, one image): the prompt the
    pipeline got and the LoRAs at the scales they ran at, so re-posting it gives the same pixels."""
    body: dict[str, Any] = {
        "task": task,
        "prompt": result.prompt,
        "negative_prompt": result.negative_prompt,
        "model": result.model,
        "width": result.width,
        "height": result.height,
        "steps": result.steps,
        "cfg_scale": result.guidance_scale,
        "seed": result.seeds[index],
        "number_of_images": 1,
        "scheduler": result.scheduler_name,
    }
    if result.strength is not None:
        body["strength"] = result.strength
    if result.hires is not None:
        hires = result.hires
        body["width"], body["height"] = result.first_pass_size or (result.width, result.height)
        body["hires"] = {"width": hires.width, "height": hires.height, "upscaler": hires.upscaler,
                         "steps": hires.steps, "strength": hires.strength}
    body |= {name: list(value) if isinstance(value, tuple) else value
             for name, value in result.family_arguments.items()}
    if result.loras:
        body["loras"] = [
            {"name": lora.name, "scale": lora.scale} | ({"weight_name": lora.weight_name} if lora.weight_name else {})
            for lora in result.loras
        ]
    return body


def a1111_parameters(result: GenerationResult, index: int) -> str:
    """The `parameters` text AUTOMATIC1111 writes, so tools that read A1111 PNGs understand ours."""
    prompt = result.prompt
    if result.loras:
        prompt += " " + " ".join(f"<lora:{lora.name}:{lora.scale}>" for lora in result.loras)
    lines = [prompt]
    if result.negative_prompt:
        lines.append(f"Negative prompt: {result.negative_prompt}")
    # FLUX has no classifier-free guidance: its guidance is what Forge writes as "Distilled CFG Scale".
    guidance = "Distilled CFG Scale" if result.family == "flux" else "CFG scale"
    fields: list[tuple[str, Any]] = [
        ("Steps", result.steps),
        ("Sampler", result.scheduler),
        (guidance, result.guidance_scale),
        ("Seed", result.seeds[index]),
        ("Size", "{}x{}".format(*(result.first_pass_size or (result.width, result.height)))),
    ]
    if result.model_sha256:
        fields.append(("Model hash", result.model_sha256[:10]))
    fields.append(("Model", result.model))
    if result.strength is not None:
        fields.append(("Denoising strength", result.strength))
    if result.hires is not None:
        fields += [("Denoising strength", result.hires.strength), ("Hires resize", f"{result.width}x{result.height}"),
                   ("Hires steps", result.hires.steps or result.steps), ("Hires upscaler", result.hires.upscaler)]
    refiner = result.family_arguments.get("refiner")
    if refiner:
        fields += [("Refiner", refiner), ("Refiner switch at", result.family_arguments.get("refiner_switch_at"))]
    hashed = [lora for lora in result.loras if lora.sha256]
    if hashed:
        fields.append(("Lora hashes", '"' + ", ".join(f"{lora.name}: {lora.sha256[:12]}" for lora in hashed) + '"'))
    fields.append(("Version", "sdserve"))
    lines.append(", ".join(f"{name}: {value}" for name, value in fields))
    return "\n".join(lines)


def sdserve_metadata(request: GenerationRequest, result: GenerationResult, index: int, job_id: str) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "version": METADATA_VERSION,
        "request": reproduction_body(request.task, result, index),
        "model_sha256": result.model_sha256,
        "job_id": job_id,
        "index": index,
    }
    if request.image is not None:
        metadata["image_digest"] = image_digest(request.image)
    if request.mask_image is not None:
        metadata["mask_image_digest"] = image_digest(request.mask_image)
    if request.controlnets:
        # The control images themselves are not stored: their digests say which they were.
        used = [{"name": spec.name, "scale": spec.scale} for spec in request.controlnets]
        digests = [image_digest(spec.image) for spec in request.controlnets]
        metadata["controlnet"] = used[0] if len(used) == 1 else used
        metadata["control_image_digest"] = digests[0] if len(digests) == 1 else digests
    return metadata


def save_png(image: Image.Image, path: Path, parameters: str, metadata: dict[str, Any]) -> SavedImage:
    """Write the PNG with both chunks atomically (temp file + rename); returns its sha256 and size."""
    info = PngInfo()
    info.add_text(PARAMETERS_CHUNK, parameters)
    info.add_text(SDSERVE_CHUNK, json.dumps(metadata, ensure_ascii=False, separators=(",", ":")))
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".saving-", suffix=".png")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            # A copy: PIL keeps save options on the image object, and the API may be encoding it right now.
            image.copy().save(handle, format="PNG", pnginfo=info)
        data = Path(temporary).read_bytes()
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return SavedImage(path=path, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def read_metadata(path: Path) -> tuple[str | None, dict[str, Any] | None]:
    """The `parameters` text and the `sdserve` JSON of a saved PNG (None where absent)."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}) or {}
    raw = text.get(SDSERVE_CHUNK)
    return text.get(PARAMETERS_CHUNK), json.loads(raw) if raw else None


def image_digest(image: Image.Image) -> str:
    """sha256 of the decoded pixels (mode and size included): equal for the same picture in any encoding."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
