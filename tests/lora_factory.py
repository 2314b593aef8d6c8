"""LoRA files for the demo model, saved the way training tools save them.

The weights are random but large (the demo UNet is random too, so a small LoRA would hardly show): a LoRA made
here changes a 64x64 image by a clearly measurable amount. The diffusers layout comes from PEFT adapters on the
demo's own UNet and text encoder, saved with `StableDiffusionPipeline.save_lora_weights` as diffusers' training
scripts do; the kohya layout is the same weights through diffusers' `convert_state_dict_to_kohya`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextModel

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class LoraWeights:
    """PEFT-layout state dicts (keys without a component prefix)."""

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]


def random_lora(model_folder: Path, seed: int, rank: int = 4, magnitude: float = 0.3,
                cross_attention_dim: int | None = None) -> LoraWeights:
    """A LoRA for the model in `model_folder`; another cross_attention_dim makes one for another architecture."""
    unet_config = dict(UNet2DConditionModel.load_config(model_folder / "unet"))
    if cross_attention_dim is not None:
        unet_config["cross_attention_dim"] = cross_attention_dim
    unet = UNet2DConditionModel.from_config(unet_config)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS))
    text_encoder = CLIPTextModel.from_pretrained(model_folder / "text_encoder")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=TEXT_ENCODER_TARGETS), text_encoder)
    generator = torch.Generator().manual_seed(seed)

    def randomised(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: torch.randn(value.shape, generator=generator) * magnitude for key, value in sorted(state.items())}

    return LoraWeights(randomised(get_peft_model_state_dict(unet)), randomised(get_peft_model_state_dict(text_encoder)))


def save_diffusers(weights: LoraWeights, folder: Path, weight_name: str | None = None, safe: bool = True,
                   peft_keys: bool = False) -> Path:
    """As diffusers' train_text_to_image_lora.py / train_dreambooth_lora.py save their output (`lora.down/up`
    keys); with peft_keys, the PEFT names (`lora_A/lora_B`) that scripts saving the PEFT state dict as is write."""
    folder.mkdir(parents=True, exist_ok=True)
    convert = (lambda state: state) if peft_keys else convert_state_dict_to_diffusers
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=convert(weights.unet),
        text_encoder_lora_layers=convert(weights.text_encoder),
        weight_name=weight_name,
        safe_serialization=safe,
    )
    return folder / (weight_name or ("pytorch_lora_weights.safetensors" if safe else "pytorch_lora_weights.bin"))


def kohya_state_dict(weights: LoraWeights, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """lora_unet_... / lora_te_... keys with lora_down, lora_up and alpha, as kohya's sd-scripts save SD 1.x."""
    peft = {f"unet.{key}": value for key, value in weights.unet.items()}
    peft |= {f"text_encoder.{key}": value for key, value in weights.text_encoder.items()}
    kohya = convert_state_dict_to_kohya(peft)
    # diffusers names the text encoder as SDXL's first one (lora_te1_); SD 1.x files say lora_te_.
    kohya = {key.replace("lora_te1_", "lora_te_", 1): value for key, value in kohya.items()}
    if alpha is not None:
        kohya = {key: torch.tensor(float(alpha)) if key.endswith(".alpha") else value for key, value in kohya.items()}
    return kohya


def save_kohya(weights: LoraWeights, file: Path, alpha: float | None = None) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(kohya_state_dict(weights, alpha), file)
    return file


def save_state_dict(state: dict[str, torch.Tensor], file: Path) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, file)
    return file
