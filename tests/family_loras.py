"""LoRA files for the tiny SDXL, SD 3.x and FLUX presets, saved the way training tools save them.

The diffusers layout: PEFT adapters on the preset's own denoiser (and text encoders where the family's loader takes
them), random and large so the change is easy to measure, saved with the family pipeline's `save_lora_weights`.
The kohya layout: SDXL's `lora_unet_` / `lora_te1_` / `lora_te2_` keys (diffusers' own converter), and FLUX's
sd-scripts keys over the original model's fused layers (`lora_unet_double_blocks_0_img_attn_qkv`, ...).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers import (
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTextModelWithProjection

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random(model: torch.nn.Module, targets: list[str], generator: torch.Generator, rank: int,
            magnitude: float) -> dict[str, torch.Tensor]:
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), model)
    state = get_peft_model_state_dict(model)
    return {key: torch.randn(value.shape, generator=generator) * magnitude for key, value in sorted(state.items())}


def family_lora(folder: Path, family: str, seed: int, rank: int = 4, magnitude: float = 0.3
                ) -> dict[str, dict[str, torch.Tensor]]:
    """Random PEFT-layout LoRA weights per component ("unet" or "transformer", "text_encoder", ...)."""
    generator = torch.Generator().manual_seed(seed)
    if family == "sdxl":
        return {
            "unet": _random(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                            ATTENTION, generator, rank, magnitude),
            "text_encoder": _random(CLIPTextModel.from_pretrained(folder / "text_encoder"), TEXT_ATTENTION,
                                    generator, rank, magnitude),
            "text_encoder_2": _random(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
                                      TEXT_ATTENTION, generator, rank, magnitude),
        }
    transformer_class = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[family]
    transformer = transformer_class.from_config(transformer_class.load_config(folder / "transformer"))
    return {"transformer": _random(transformer, ATTENTION, generator, rank, magnitude)}


def save_diffusers(weights: dict[str, dict[str, torch.Tensor]], family: str, folder: Path) -> Path:
    """pytorch_lora_weights.safetensors as the family's diffusers training script writes it."""
    pipeline_class = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}[family]
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(folder, **{f"{component}_lora_layers": state
                                                for component, state in weights.items()})
    return folder / "pytorch_lora_weights.safetensors"


def save_kohya_sdxl(weights: dict[str, dict[str, torch.Tensor]], file: Path) -> Path:
    peft = {f"{component}.{key}": value for component, state in weights.items() for key, value in state.items()}
    file.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(convert_state_dict_to_kohya(peft), file)
    return file


def save_kohya_flux(folder: Path, seed: int, file: Path, rank: int = 4, magnitude: float = 0.3) -> Path:
    """A FLUX LoRA as kohya's sd-scripts write it: on the original model's layers, whose attention projects q, k
    and v with one fused matrix (`img_attn_qkv`), for the image and the text stream of every double block."""
    config = FluxTransformer2DModel.load_config(folder / "transformer")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for block in range(config["num_layers"]):
        for stream in ("img", "txt"):
            for layer, outputs in (("attn_qkv", 3 * width), ("attn_proj", width)):
                key = f"lora_unet_double_blocks_{block}_{stream}_{layer}"
                state[f"{key}.lora_down.weight"] = torch.randn(rank, width, generator=generator) * magnitude
                state[f"{key}.lora_up.weight"] = torch.randn(outputs, rank, generator=generator) * magnitude
                state[f"{key}.alpha"] = torch.tensor(float(rank))
    file.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, file)
    return file
