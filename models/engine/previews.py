"""Cheap previews of an image while it is being denoised: latents -> RGB by a linear map, then a small JPEG.

A full VAE decode per preview would cost as much as a denoising step. Instead each VAE gets a per-channel
linear approximation (latent channels + bias -> RGB), fitted once by least squares from the VAE's own encoder
on a few flat-coloured test images. That works for any latent layout (SD 1.x, SDXL, SD 3.x and FLUX's 16
channels with their shift, the demo's pass-through VAE) without tables of constants, and costs a few small encoder
passes the first time a model is previewed. FLUX's latents, packed 2x2 into tokens, arrive here unpacked
(models/engine/generate.py does it, knowing the image size).
"""

from __future__ import annotations

import io
import logging
import threading
import weakref
from typing import Any

import torch
from PIL import Image

logger = logging.getLogger(__name__)

PREVIEW_MAX_SIDE = 192
JPEG_QUALITY = 70
_FIT_IMAGES = 4
_FIT_SIDE = 64
_FIT_BLOCK = 16  # flat colour blocks span 2x2 latents, so most latents see a single colour


class LatentPreviewer:
    """Turns a batch of latents into a small JPEG of the first image. Called on the worker thread."""

    def __init__(self) -> None:
        self._fits: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._failed_once = False

    def jpeg(self, pipeline: Any, latents: torch.Tensor) -> bytes | None:
        """JPEG bytes, or None when this pipeline cannot be previewed (never fails the generation)."""
        try:
            return self._jpeg(pipeline, latents)
        except Exception:
            if not self._failed_once:
                logger.warning("latent preview failed; progress goes on without previews", exc_info=True)
                self._failed_once = True
            return None

    def _jpeg(self, pipeline: Any, latents: torch.Tensor) -> bytes | None:
        vae = getattr(pipeline, "vae", None)
        if vae is None or latents.ndim != 4:
            return None
        weights = self._fit_for(pipeline, vae)
        if weights.shape[0] != latents.shape[1] + 1:
            return None
        first = latents[0].detach().to("cpu", torch.float32)  # channels, height, width
        channels, height, width = first.shape
        flat = torch.cat([first.reshape(channels, -1), torch.ones(1, height * width)])
        rgb = (weights.T @ flat).reshape(3, height, width)
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        image = Image.fromarray(pixels, "RGB")
        scale = max(1, min(8, PREVIEW_MAX_SIDE // max(height, width)))
        if scale > 1:
            image = image.resize((width * scale, height * scale), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()

    def _fit_for(self, pipeline: Any, vae: torch.nn.Module) -> torch.Tensor:
        with self._lock:
            weights = self._fits.get(vae)
            if weights is None:
                weights = fit_latent_to_rgb(vae, _execution_device(pipeline))
                self._fits[vae] = weights
            return weights


def fit_latent_to_rgb(vae: Any, device: torch.device) -> torch.Tensor:
    """Least-squares map from (latent channels + 1) to RGB in [-1, 1], as the denoiser sees latents."""
    generator = torch.Generator("cpu").manual_seed(0)
    blocks = _FIT_SIDE // _FIT_BLOCK
    colours = torch.rand(_FIT_IMAGES, 3, blocks, blocks, generator=generator) * 2 - 1
    images = colours.repeat_interleave(_FIT_BLOCK, dim=2).repeat_interleave(_FIT_BLOCK, dim=3)
    with torch.inference_mode():
        encoded = vae.encode(images.to(device, vae.dtype)).latent_dist.mean.float().cpu()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = (encoded - shift) * vae.config.scaling_factor
    factor = _FIT_SIDE // latents.shape[-1]
    targets = torch.nn.functional.avg_pool2d(images, factor)  # the colour under each latent
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    inputs = torch.cat([inputs, torch.ones(inputs.shape[0], 1)], dim=1)
    outputs = targets.permute(0, 2, 3, 1).reshape(-1, 3)
    return torch.linalg.lstsq(inputs, outputs).solution  # (channels + 1, 3)


def _execution_device(pipeline: Any) -> torch.device:
    device = getattr(pipeline, "_execution_device", None)
    return device if isinstance(device, torch.device) else torch.device("cpu")
