"""The OpenVINO fast path for CPUs: the pipeline's UNet exported once to OpenVINO, cached on disk, reused.
(The VAE decoder goes the same way in openvino_vae.py; the steps they share are in openvino_export.py.)

1. Identify: a digest of the UNet's config and weights (and the diffusers / OpenVINO versions that shape the
   export) names its cache folder, so a fine-tune, a new checkpoint or an upgrade exports again, and a restart
   or a second server on the same cache does not.
2. Export once: `openvino.convert_model` traces the torch UNet with dynamic batch, height, width and prompt length,
   and the IR (float32 weights, uncompressed) is saved atomically under a file lock into CACHE_DIR/openvino/.
3. Compile: OpenVINO's own compiled-blob cache (CACHE_DIR/openvino/compiled) makes later compiles an import.
4. Route each call: the torch UNet stays in the pipeline (diffusers, PEFT and the rest of the code see the real
   module); only its `forward` is replaced, by a function that runs the compiled model when the call is one the
   export covers, and the original forward otherwise.

LoRAs: a call whose UNet has LoRA adapters enabled (or merged) runs on the torch UNet, so LoRA images are exactly
the eager ones at eager speed, and requests without LoRAs keep the fast path. Calls with ControlNet residuals,
extra conditioning or latent sizes the traced graph does not cover run on torch the same way.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from models.engine.openvino_export import (
    OpenVinoMissing,
    Routed,
    compile_ir,
    install,
    load_openvino,
    lora_active,
    openvino_available,
    routed_of,
    save_ir,
    uninstall,
    weights_digest,
)
from models.engine.openvino_export import ensure_exported as _ensure_exported

__all__ = ["OpenVinoMissing", "OpenVinoUNet", "attach", "detach", "ensure_exported", "lora_active",
           "openvino_available", "unet_identity"]

logger = logging.getLogger(__name__)

EXPORT_VERSION = 1  # bump when the export changes (inputs, options), so cached IRs are made again
IR_NAME = "unet.xml"
# Arguments of UNet2DConditionModel.forward that the exported graph does not take: a call with any of them set runs
# on torch (ControlNet residuals, T2I adapters, SDXL-style added conditions, LCM timestep conditions, masks).
_UNCOVERED_ARGUMENTS = (
    "class_labels", "timestep_cond", "attention_mask", "added_cond_kwargs", "down_block_additional_residuals",
    "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask",
)


# -- 1. identity ---------------------------------------------------------------------------------------------------
def unet_identity(unet: torch.nn.Module) -> str:
    """A digest of what the exported graph depends on: config, every weight, and the exporting code's versions."""
    return weights_digest(dict(unet.config), unet, EXPORT_VERSION)


# -- 2. export -------------------------------------------------------------------------------------------------------
class _UNetCall(torch.nn.Module):
    """The UNet call the pipelines make, with positional tensors only: what convert_model traces. The UNet is a
    submodule so that tracing sees its weights as parameters; its class's forward is called, never a replacement."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states, return_dict=False)[0]


def _latent_multiple(unet: torch.nn.Module) -> int:
    """Latent sizes the traced graph covers are multiples of this (the UNet's total downsampling)."""
    return 2 ** (len(unet.config.block_out_channels) - 1)


def _export(unet: torch.nn.Module, folder: Path) -> None:
    openvino = load_openvino()
    side = 2 * _latent_multiple(unet)  # small: tracing runs the model once, and the shapes are made dynamic below
    example = (
        torch.zeros(2, unet.config.in_channels, side, side),
        torch.tensor(500.0),
        torch.zeros(2, 77, unet.config.cross_attention_dim),
    )
    started = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        # Tracing fixes shape-dependent branches (upsampling sizes, batch-size checks) as constants; the router
        # sends the shapes those constants do not cover to torch, so the tracer's warnings say nothing new.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = openvino.convert_model(_UNetCall(unet), example_input=example)
    model.reshape({
        model.inputs[0]: openvino.PartialShape([-1, unet.config.in_channels, -1, -1]),
        model.inputs[1]: openvino.PartialShape([]),
        model.inputs[2]: openvino.PartialShape([-1, -1, unet.config.cross_attention_dim]),
    })
    save_ir(model, folder / IR_NAME, "UNet", started)


def ensure_exported(unet: torch.nn.Module, cache_dir: Path, identity: str) -> tuple[Path, bool]:
    """The folder of this UNet's IR, exporting it first if no earlier run did; and whether this call exported."""
    return _ensure_exported(
        cache_dir, f"unet-{identity[:24]}", IR_NAME, lambda folder: _export(unet, folder),
        {"identity": identity, "export_version": EXPORT_VERSION, "class": type(unet).__name__},
    )


# -- 3. compile: openvino_export.compile_ir ------------------------------------------------------------------------
# -- 4. routing calls ------------------------------------------------------------------------------------------------
class OpenVinoUNet(Routed):
    """The compiled UNet attached to a torch UNet; `calls` counts where each UNet call ran."""

    @property
    def unet(self) -> torch.nn.Module:
        return self.module

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                *args: Any, return_dict: bool = True, **kwargs: Any) -> Any:
        reason = self._uncovered(sample, timestep, encoder_hidden_states, args, kwargs)
        if reason is not None:
            return self.on_torch(reason, sample, timestep, encoder_hidden_states, *args, return_dict=return_dict,
                                 **kwargs)
        step = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)[0]
        noise = self.infer([sample.contiguous().numpy(), step.numpy(), encoder_hidden_states.contiguous().numpy()])
        if not return_dict:
            return (noise,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=noise)

    def _uncovered(self, sample: torch.Tensor, timestep: Any, hidden: torch.Tensor, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> str | None:
        """Why this call cannot run on the exported graph, or None when it can."""
        if args or any(kwargs.get(name) is not None for name in _UNCOVERED_ARGUMENTS):
            return "a call with extra conditioning (ControlNet, adapters, added conditions)"
        if kwargs.get("cross_attention_kwargs"):
            return "a call with cross-attention arguments"
        if sample.device.type != "cpu" or sample.dtype != torch.float32 or hidden.dtype != torch.float32:
            return "a call that is not float32 on the CPU"
        if torch.is_tensor(timestep) and timestep.numel() > 1 and not bool((timestep == timestep.flatten()[0]).all()):
            return "a call with a different timestep per image"
        multiple = _latent_multiple(self.module)
        if sample.shape[-1] % multiple or sample.shape[-2] % multiple:
            return f"latents whose sides are not multiples of {multiple} (images not multiples of {8 * multiple})"
        if lora_active(self.module):
            return "LoRA adapters are active"
        return None


def attach(unet: torch.nn.Module, cache_dir: Path) -> OpenVinoUNet:
    """Export (or find), compile, and route `unet`'s calls through OpenVINO. Call it before loading any LoRA."""
    existing = routed_of(unet)
    if existing is not None:
        return existing  # type: ignore[return-value]
    if lora_active(unet):
        raise ValueError("attach the OpenVINO UNet before loading LoRAs: the export must hold the base weights")
    started = time.perf_counter()
    identity = unet_identity(unet)
    logger.info("UNet identity %s (%.1fs)", identity[:24], time.perf_counter() - started)
    folder, exported = ensure_exported(unet, cache_dir, identity)
    fast = OpenVinoUNet(what="UNet", module=unet, torch_forward=unet.forward,
                        compiled=compile_ir(folder / IR_NAME, cache_dir, "UNet"), folder=folder, exported=exported)
    install(unet, fast, fast.forward)
    return fast


def detach(unet: torch.nn.Module) -> None:
    """Give the UNet its torch forward back."""
    uninstall(unet)
