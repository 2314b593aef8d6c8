"""Hires fix (A1111's two-pass generation): the first pass at the request's size, an upscale, an img2img second
pass at the larger size. Runs on the worker thread, inside models/engine/generate.py's `generate`.

Latent upscalers resize the first pass's latents (no VAE decode and encode between the passes, as A1111's
"Latent" upscalers do); image upscalers decode the first pass and resize the pictures with PIL.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from models.types import HiresFix

# upscaler -> (torch interpolation mode, antialias), as A1111's latent upscale modes
_LATENT_MODES = {
    "latent": ("bilinear", False),
    "latent-antialiased": ("bilinear", True),
    "latent-bicubic": ("bicubic", False),
    "latent-bicubic-antialiased": ("bicubic", True),
    "latent-nearest": ("nearest", False),
    "latent-nearest-exact": ("nearest-exact", False),
}
_IMAGE_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def is_latent(hires: HiresFix) -> bool:
    return hires.upscaler in _LATENT_MODES


def second_pass_steps(hires: HiresFix, steps: int) -> int:
    return hires.steps or steps


def expected_second_pass_steps(hires: HiresFix, steps: int) -> int:
    """Denoising steps the img2img pass runs (strength x steps, as diffusers counts them), for progress totals."""
    total = second_pass_steps(hires, steps)
    return max(1, min(int(total * hires.strength), total))


def upscale(first_pass: Any, hires: HiresFix, vae_scale_factor: int) -> Any:
    """The first pass's output (latents, or PIL images) at the hires size, ready as the img2img `image`."""
    if is_latent(hires):
        latents: torch.Tensor = first_pass
        size = (hires.height // vae_scale_factor, hires.width // vae_scale_factor)
        mode, antialias = _LATENT_MODES[hires.upscaler]
        options = {"align_corners": False, "antialias": antialias} if mode in ("bilinear", "bicubic") else {}
        return F.interpolate(latents, size=size, mode=mode, **options)
    resample = _IMAGE_FILTERS[hires.upscaler]
    return [image.resize((hires.width, hires.height), resample) for image in first_pass]
