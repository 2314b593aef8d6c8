"""The OpenVINO fast path for CPUs, VAE part: the VAE's decoder exported once to OpenVINO, cached on disk, reused.

The same four steps as the UNet's (openvino_unet.py; shared code in openvino_export.py):
1. Identify: a digest of the VAE's config and the decoder's weights names the cache folder
   CACHE_DIR/openvino/vae-decoder-<digest>/.
2. Export once: `openvino.convert_model` traces `vae.decoder` with dynamic batch, height and width (the decoder has
   no shape-dependent branches, so one graph covers every latent size), float32 weights.
3. Compile: float32, torch's thread count, OpenVINO's blob cache.
4. Route each call: `vae.decoder`'s forward is replaced on the instance, so `AutoencoderKL.decode`, its slicing and
   tiling paths, and every pipeline that calls `vae.decode` (text2img, img2img, inpainting, ControlNet variants made
   with from_pipe) run the decoder on OpenVINO; calls the graph does not cover run on the torch decoder.

Why the decoder and not all of `_decode`: `post_quant_conv` before it is one 1x1 convolution on 4 channels
(microseconds), and routing the decoder module keeps diffusers' tiling, which calls `self.decoder` per tile, on the
fast path too. The encoder (img2img, inpainting) and the text encoder stay on torch: they are a small share of a
request (the text encoder 0.2% in the profile).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.engine.openvino_export import (
    Routed,
    compile_ir,
    ensure_exported,
    install,
    load_openvino,
    lora_active,
    routed_of,
    save_ir,
    uninstall,
    weights_digest,
)

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the export changes (inputs, options), so cached IRs are made again
IR_NAME = "vae_decoder.xml"


def supports(vae: Any) -> bool:
    """Whether `vae` is a diffusers AutoencoderKL with the plain Decoder this module exports (not, e.g., the
    asymmetric VAE's mask-conditioned decoder or the tiny autoencoder)."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import Decoder

    return isinstance(vae, AutoencoderKL) and type(vae.decoder) is Decoder


# -- 1. identity ---------------------------------------------------------------------------------------------------
def decoder_identity(vae: torch.nn.Module) -> str:
    """A digest of what the exported decoder depends on: the VAE's config, every decoder weight, the versions."""
    return weights_digest(dict(vae.config) | {"exported_part": "decoder"}, vae.decoder, EXPORT_VERSION)


# -- 2. export -------------------------------------------------------------------------------------------------------
class _DecoderCall(torch.nn.Module):
    """The decoder call `AutoencoderKL._decode` makes: what convert_model traces (the class's forward, never a
    replacement)."""

    def __init__(self, decoder: torch.nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return type(self.decoder).forward(self.decoder, latents)


def _export(vae: torch.nn.Module, folder: Path) -> None:
    openvino = load_openvino()
    channels = vae.config.latent_channels
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # The decoder's only shape-dependent branch (contiguous() for batches of 64 and more) changes no values.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = openvino.convert_model(_DecoderCall(vae.decoder), example_input=(torch.zeros(1, channels, 8, 8),))
    model.reshape({model.inputs[0]: openvino.PartialShape([-1, channels, -1, -1])})
    save_ir(model, folder / IR_NAME, "VAE decoder", started)


# -- 4. routing calls ------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class OpenVinoVaeDecoder(Routed):
    """The compiled decoder attached to a VAE's torch decoder; `calls` counts where each decoder call ran."""

    vae: Any = None  # the AutoencoderKL owning the decoder: PEFT marks its LoRAs there

    def forward(self, sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reason = self._uncovered(sample, args, kwargs)
        if reason is not None:
            return self.on_torch(reason, sample, *args, **kwargs)
        return self.infer([sample.contiguous().numpy()])

    def _uncovered(self, sample: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """Why this call cannot run on the exported graph, or None when it can."""
        if any(each is not None for each in args) or any(each is not None for each in kwargs.values()):
            return "a call with latent embeddings (a spatially conditioned decoder)"
        if sample.device.type != "cpu" or sample.dtype != torch.float32:
            return "a call that is not float32 on the CPU"
        if sample.dim() != 4 or sample.shape[1] != self.vae.config.latent_channels:
            return "latents of another shape than (batch, latent channels, height, width)"
        if torch.is_grad_enabled() and (sample.requires_grad or self.module.training):
            return "a call that needs gradients (training)"
        if lora_active(self.vae):
            return "LoRA adapters are active on the VAE"
        return None


def attach(vae: torch.nn.Module, cache_dir: Path) -> OpenVinoVaeDecoder:
    """Export (or find), compile, and route `vae.decoder`'s calls through OpenVINO. Call it before loading LoRAs."""
    if not supports(vae):
        raise ValueError(f"the OpenVINO VAE decoder is for AutoencoderKL's Decoder, not {type(vae).__name__}")
    existing = routed_of(vae.decoder)
    if existing is not None:
        return existing  # type: ignore[return-value]
    started = time.perf_counter()
    identity = decoder_identity(vae)
    logger.info("VAE decoder identity %s (%.1fs)", identity[:24], time.perf_counter() - started)
    folder, exported = ensure_exported(
        cache_dir, f"vae-decoder-{identity[:24]}", IR_NAME, lambda scratch: _export(vae, scratch),
        {"identity": identity, "export_version": EXPORT_VERSION, "class": type(vae).__name__, "part": "decoder"},
    )
    fast = OpenVinoVaeDecoder(what="VAE decoder", module=vae.decoder, torch_forward=vae.decoder.forward,
                              compiled=compile_ir(folder / IR_NAME, cache_dir, "VAE decoder"), folder=folder,
                              exported=exported, vae=vae)
    install(vae.decoder, fast, fast.forward)
    return fast


def detach(vae: torch.nn.Module) -> None:
    """Give the VAE its torch decoder forward back."""
    uninstall(vae.decoder)
