"""LoRA layers on the UNet (and optionally the text encoders) with peft, saved in the format diffusers loads.

The weights file is what the base family's pipeline writes with `save_lora_weights` (StableDiffusionPipeline's,
or StableDiffusionXLPipeline's with the second text encoder's layers), including peft's adapter config (so
`load_lora_weights` restores alpha exactly), plus `sdserve.*` metadata naming the base, the data and the options.
Text encoders are passed by component name ("text_encoder", "text_encoder_2"): that name is the key prefix.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.training_utils import _set_state_dict_into_text_encoder, cast_training_params
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from models.errors import InvalidRequest
from models.registry import Registry
from training.base_model import BaseChoice
from training.config import TrainingOptions
from training.registration import register_weights

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_PREFIX = "sdserve."


TextEncoders = dict[str, torch.nn.Module]  # component name -> text encoder with LoRA layers (empty: none trained)


def add_lora_layers(unet: torch.nn.Module, text_encoders: TextEncoders, options: TrainingOptions) -> None:
    """Freeze everything, then add trainable LoRA layers (B starts at zero: the model is unchanged at step 0)."""
    unet.add_adapter(
        LoraConfig(
            r=options.rank, lora_alpha=options.alpha, lora_dropout=options.lora_dropout,
            init_lora_weights="gaussian", target_modules=options.unet_target_modules,
        )
    )
    _check_targets(unet, "unet_target_modules", options.unet_target_modules)
    for text_encoder in text_encoders.values():
        # peft itself rather than transformers' add_adapter: that integration gates on peft versions of its own.
        text_encoder.requires_grad_(False)
        inject_adapter_in_model(
            LoraConfig(
                r=options.rank, lora_alpha=options.alpha, lora_dropout=options.lora_dropout,
                init_lora_weights="gaussian", target_modules=options.text_encoder_target_modules,
            ),
            text_encoder,
        )
        _check_targets(text_encoder, "text_encoder_target_modules", options.text_encoder_target_modules)


def _check_targets(model: torch.nn.Module, option: str, targets: list[str]) -> None:
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise InvalidRequest(f"{option} {targets} matched no layer of the {type(model).__name__}")


def trainable_parameters(*models: torch.nn.Module | None) -> list[torch.nn.Parameter]:
    return [p for model in models if model is not None for p in model.parameters() if p.requires_grad]


def keep_trainable_in_float32(*models: torch.nn.Module | None) -> None:
    """With fp16/bf16 frozen weights, the LoRA weights and their optimizer state stay float32."""
    cast_training_params([model for model in models if model is not None], dtype=torch.float32)


def lora_layers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's own key names (`...to_q.lora_A.weight`), which load_lora_weights reads for every layer type.

    Not diffusers' older `lora.down` names: their converter renames attention layers only, and a file mixing both
    spellings loads without the attention layers.
    """
    return get_peft_model_state_dict(model)


def save_lora_weights(
    folder: Path, unet: torch.nn.Module, text_encoders: TextEncoders, metadata: dict[str, str] | None = None,
    two_text_encoders: bool = False,
) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors` (diffusers format) with `metadata` added, atomically.
    `two_text_encoders`: the base is SDXL, whose pipeline class writes (and reads) the second encoder's layers."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class = StableDiffusionXLPipeline if two_text_encoders else StableDiffusionPipeline
    layers: dict[str, object] = {
        "unet_lora_layers": lora_layers(unet), "unet_lora_adapter_metadata": unet.peft_config["default"].to_dict(),
    }
    for name, text_encoder in text_encoders.items():
        layers[f"{name}_lora_layers"] = lora_layers(text_encoder)
        layers[f"{name}_lora_adapter_metadata"] = text_encoder.peft_config["default"].to_dict()
    with tempfile.TemporaryDirectory(dir=folder, prefix=".weights-") as scratch:
        pipeline_class.save_lora_weights(scratch, safe_serialization=True, **layers)
        written = Path(scratch) / WEIGHTS_NAME
        if metadata:
            _add_metadata(written, metadata)
        target = folder / WEIGHTS_NAME
        os.replace(written, target)
    return target


def _add_metadata(path: Path, extra: dict[str, str]) -> None:
    with safe_open(str(path), framework="pt") as stream:
        metadata = dict(stream.metadata() or {})
    tensors = load_file(str(path))
    metadata.update({METADATA_PREFIX + key: str(value) for key, value in extra.items()})
    save_file(tensors, str(path), metadata=metadata)


def read_metadata(path: Path) -> dict[str, str]:
    """The `sdserve.*` metadata of a weights file, without the prefix."""
    with safe_open(str(path), framework="pt") as stream:
        metadata = stream.metadata() or {}
    return {
        key.removeprefix(METADATA_PREFIX): value for key, value in metadata.items() if key.startswith(METADATA_PREFIX)
    }


def load_lora_weights_into(folder: Path, unet: torch.nn.Module, text_encoders: TextEncoders) -> None:
    """Put the LoRA weights of a checkpoint back into the training models (resume)."""
    state = load_file(str(folder / WEIGHTS_NAME))
    unet_state = {key.removeprefix("unet."): value for key, value in state.items() if key.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise InvalidRequest(f"checkpoint {folder} does not match these LoRA options: unexpected {unexpected[:3]}")
    for name, text_encoder in text_encoders.items():
        if not any(key.startswith(f"{name}.") for key in state):
            raise InvalidRequest(f"checkpoint {folder} has no {name} LoRA but --train-text-encoder is set")
        _set_state_dict_into_text_encoder(state, prefix=f"{name}.", text_encoder=text_encoder)


def describe_options(options: TrainingOptions) -> dict[str, str]:
    """The LoRA shape as metadata strings."""
    return {
        "rank": str(options.rank),
        "alpha": str(options.alpha),
        "unet_target_modules": json.dumps(options.unet_target_modules),
        "text_encoder_target_modules": json.dumps(
            options.text_encoder_target_modules if options.train_text_encoder else []
        ),
    }


class LoraWeights:
    """LoRA layers on the frozen UNet (and text encoders) as the trained weights of a run: what the loop asks of
    them is the same as of `training.full_model.FullWeights`."""

    result_name = WEIGHTS_NAME

    def __init__(self, options: TrainingOptions, unet: torch.nn.Module, text_encoders: TextEncoders,
                 two_text_encoders: bool):
        self.options = options
        self.unet = unet
        self.text_encoders = dict(text_encoders) if options.train_text_encoder else {}
        self.two_text_encoders = two_text_encoders
        self.trained: dict[str, torch.nn.Module] = {"unet": unet, **self.text_encoders}

    def attach(self) -> None:
        add_lora_layers(self.unet, self.text_encoders, self.options)

    def save_checkpoint(self, folder: Path) -> None:
        save_lora_weights(folder, self.unet, self.text_encoders, two_text_encoders=self.two_text_encoders)

    def load_checkpoint(self, folder: Path) -> None:
        load_lora_weights_into(folder, self.unet, self.text_encoders)

    def describe(self) -> dict[str, str]:
        return describe_options(self.options)

    def save_result(self, folder: Path, metadata: dict[str, str]) -> Path:
        return save_lora_weights(folder, self.unet, self.text_encoders, metadata,
                                 two_text_encoders=self.two_text_encoders)

    def register(self, registry: Registry, base: BaseChoice, weights: Path, run_id: str,
                 trigger_words: list[str]) -> None:
        register_weights(self.options, base, registry, weights, run_id, trigger_words)
