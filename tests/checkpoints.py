"""Single-file checkpoints made in the tests: a diffusers SDXL folder written back as one .safetensors file in the
original (Stability "sgm") layout most SDXL fine-tunes are shared in.

The layout, key by key: the UNet under `model.diffusion_model.` with LDM block numbering (input_blocks,
middle_block, output_blocks; resnets as in_layers/out_layers/emb_layers), the VAE under `first_stage_model.` (down,
mid, up with the decoder's blocks numbered from the bottom; attention as 1x1 convolutions), CLIP ViT-L as
transformers saved it under `conditioner.embedders.0.transformer.`, and OpenCLIP bigG under
`conditioner.embedders.1.model.` (resblocks with fused in_proj q/k/v, the text projection transposed). This is the
inverse of what diffusers' single-file loader converts, written from the layouts, so a load that gives back the
same tensors shows the loader read every part.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def sdxl_single_file(folder: Path, target: Path) -> Path:
    """Write the SDXL pipeline in `folder` (a diffusers folder) as one original-layout .safetensors file."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    state: dict[str, torch.Tensor] = {}
    state |= {f"model.diffusion_model.{key}": value for key, value in _unet(unet).items()}
    state |= {f"first_stage_model.{key}": value for key, value in _vae(vae).items()}
    state |= {f"conditioner.embedders.0.transformer.text_model.{key.removeprefix('text_model.')}": value
              for key, value in text_encoder.state_dict().items()}
    state |= {f"conditioner.embedders.1.model.{key}": value for key, value in _open_clip(text_encoder_2).items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({key: value.contiguous() for key, value in state.items()}, target)
    return target


def _rename(key: str, old: str, new: str, table: dict[str, str] | None = None) -> str:
    rest = key.removeprefix(old)
    for diffusers_name, original_name in (table or {}).items():
        if rest.startswith(f".{diffusers_name}."):
            rest = f".{original_name}." + rest.removeprefix(f".{diffusers_name}.")
    return new + rest


def _unet(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    config = unet.config
    per_block = config.layers_per_block + 1  # each up block has one resnet more than a down block
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    prefixes: list[tuple[str, str, dict[str, str] | None]] = []
    for block in range(len(config.block_out_channels)):
        for layer in range(config.layers_per_block):
            number = per_block * block + layer + 1
            prefixes += [(f"down_blocks.{block}.resnets.{layer}", f"input_blocks.{number}.0", _RESNET),
                         (f"down_blocks.{block}.attentions.{layer}", f"input_blocks.{number}.1", None)]
        prefixes.append((f"down_blocks.{block}.downsamplers.0.conv", f"input_blocks.{per_block * (block + 1)}.0.op",
                         None))
    prefixes += [("mid_block.resnets.0", "middle_block.0", _RESNET), ("mid_block.attentions.0", "middle_block.1", None),
                 ("mid_block.resnets.1", "middle_block.2", _RESNET)]
    for block, block_type in enumerate(config.up_block_types):
        for layer in range(per_block):
            number = per_block * block + layer
            prefixes += [(f"up_blocks.{block}.resnets.{layer}", f"output_blocks.{number}.0", _RESNET),
                         (f"up_blocks.{block}.attentions.{layer}", f"output_blocks.{number}.1", None)]
        upsampler = 2 if block_type.startswith("CrossAttn") else 1
        prefixes.append((f"up_blocks.{block}.upsamplers.0.conv",
                         f"output_blocks.{per_block * block + per_block - 1}.{upsampler}.conv", None))
    converted = {}
    for key, value in unet.state_dict().items():
        name, _, parameter = key.rpartition(".")
        if name in simple:
            converted[f"{simple[name]}.{parameter}"] = value
            continue
        match = next((entry for entry in prefixes if key.startswith(entry[0] + ".")), None)
        if match is None:
            raise KeyError(f"no original name for UNet key {key}")
        converted[_rename(key, match[0], match[1], match[2])] = value
    return converted


def _vae(vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    prefixes = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        prefixes |= {f"{part}.mid_block.resnets.0": f"{part}.mid.block_1",
                     f"{part}.mid_block.resnets.1": f"{part}.mid.block_2",
                     f"{part}.mid_block.attentions.0": f"{part}.mid.attn_1"}
    for block in range(blocks):
        prefixes |= {f"encoder.down_blocks.{block}.resnets": f"encoder.down.{block}.block",
                     f"encoder.down_blocks.{block}.downsamplers.0.conv": f"encoder.down.{block}.downsample.conv",
                     f"decoder.up_blocks.{block}.resnets": f"decoder.up.{blocks - 1 - block}.block",
                     f"decoder.up_blocks.{block}.upsamplers.0.conv": f"decoder.up.{blocks - 1 - block}.upsample.conv"}
    converted = {}
    for key, value in vae.state_dict().items():
        old = next((prefix for prefix in prefixes if key.startswith(prefix + ".")), None)
        if old is None:  # conv_in, conv_out, quant_conv, post_quant_conv keep their names
            converted[key] = value
        elif ".mid_block.attentions." in key:  # attention projections are 1x1 convolutions there
            converted[_rename(key, old, prefixes[old], _VAE_ATTENTION)] = value[:, :, None, None] if value.ndim == 2 \
                else value
        else:
            converted[_rename(key, old, prefixes[old]).replace("conv_shortcut", "nin_shortcut")] = value
    return converted


def _open_clip(encoder: CLIPTextModelWithProjection) -> dict[str, torch.Tensor]:
    state = encoder.state_dict()
    converted = {
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for layer in range(encoder.config.num_hidden_layers):
        prefix = f"text_model.encoder.layers.{layer}."
        for kind in ("weight", "bias"):
            fused = [state.pop(f"{prefix}self_attn.{part}_proj.{kind}") for part in "qkv"]
            converted[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(fused)
            for diffusers_name, original_name in layer_names.items():
                converted[f"transformer.resblocks.{layer}.{original_name}.{kind}"] = state.pop(
                    f"{prefix}{diffusers_name}.{kind}")
    if state:
        raise KeyError(f"no original name for text encoder 2 keys {sorted(state)[:5]}")
    return converted
