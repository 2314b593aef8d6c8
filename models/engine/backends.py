"""How a loaded base model runs: eager torch (diffusers as it is) or the OpenVINO fast path for CPUs.

The choice is per registry entry (`backend: openvino`), else the setting SDSERVE_BACKEND (default torch).
The pipeline cache calls `apply_backend` once, right after a base is loaded and placed on its device and before
any LoRA is loaded into it:

    pipeline = self._place(pipeline)
    apply_backend(pipeline, backend_for(entry, self.settings), self.device, self.settings.cache_dir)

On openvino the UNet (models/engine/openvino_unet.py) and the VAE decoder (models/engine/openvino_vae.py) run on
OpenVINO; the text encoder, the VAE encoder, schedulers, LoRA loading and the pipelines derived with from_pipe stay
diffusers' (the derived pipelines share the routed modules, so they get the fast path too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DiffusionPipeline

from models.engine import openvino_export, openvino_unet, openvino_vae
from models.errors import ModelUnavailable

logger = logging.getLogger(__name__)

Backend = Literal["torch", "openvino"]
BACKENDS: tuple[str, ...] = ("torch", "openvino")


@dataclass
class OpenVinoParts:
    """What runs on OpenVINO in one loaded pipeline; each part counts where its calls ran (`calls`)."""

    unet: openvino_unet.OpenVinoUNet
    vae_decoder: openvino_vae.OpenVinoVaeDecoder | None  # None: a VAE the export does not cover runs on torch

    @property
    def exported(self) -> bool:
        """Whether this load exported anything (False: every part came from the cache)."""
        return any(part.exported for part in self.parts)

    @property
    def parts(self) -> list[openvino_export.Routed]:
        return [part for part in (self.unet, self.vae_decoder) if part is not None]

    def describe(self) -> str:
        parts = ", ".join(part.describe() for part in self.parts)
        return parts if self.vae_decoder is not None else parts + "; the VAE decoder stays on torch"


def backend_for(entry_backend: str | None, default: str) -> str:
    """The registry entry's backend when it names one, else the server's setting."""
    return entry_backend or default


def apply_backend(
    pipeline: DiffusionPipeline, backend: str, device: torch.device, cache_dir: Path, model_name: str = "model"
) -> OpenVinoParts | None:
    """Make `pipeline` run on `backend`; returns what runs on OpenVINO when that backend is attached, else None.

    Raises ModelUnavailable when the backend cannot serve this model here, naming the model and what to change:
    a server should not quietly run ten times slower (or faster) than its registry says.
    """
    if backend == "torch":
        return None
    if backend != "openvino":
        raise ModelUnavailable(f"model {model_name!r}: unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
    unet = getattr(pipeline, "unet", None)
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet.config, "cross_attention_dim"):
        raise ModelUnavailable(
            f"model {model_name!r} ({type(pipeline).__name__}) has no Stable Diffusion UNet; the OpenVINO backend "
            "serves SD 1.x/2.x-style pipelines: use backend torch for it"
        )
    if device.type != "cpu" or unet.dtype != torch.float32:
        raise ModelUnavailable(
            f"model {model_name!r}: the OpenVINO backend runs float32 models on the CPU, and this server runs "
            f"{str(unet.dtype).removeprefix('torch.')} on {device.type}; use backend torch here "
            "(SDSERVE_BACKEND=torch, or remove `backend: openvino` from its registry entry)"
        )
    try:
        fast = OpenVinoParts(unet=openvino_unet.attach(unet, cache_dir), vae_decoder=None)
        vae = getattr(pipeline, "vae", None)
        if openvino_vae.supports(vae):
            fast.vae_decoder = openvino_vae.attach(vae, cache_dir)
    except openvino_export.OpenVinoMissing as error:
        raise ModelUnavailable(f"model {model_name!r}: {error}") from error
    logger.info("model %r runs on OpenVINO: %s", model_name, fast.describe())
    return fast
