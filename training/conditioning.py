"""How a base's UNet is conditioned on text, per family: what the training loop feeds it besides noisy latents.

SD 1.x/2.x: one CLIP encoder; the UNet cross-attends to its last hidden state.
SDXL: two CLIP encoders; the UNet cross-attends to both penultimate hidden states side by side, and its added
conditioning takes the second encoder's pooled projection and six "time ids": the image's original size, the
top-left corner of the crop taken from it and the target size ((height, width), (top, left), (height, width)),
exactly as the SDXL pipelines build them at generation time (models/engine/generate.py runs those pipelines).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiffusionPipeline

from models.families import Family

TEXT_ENCODER_NAMES = ("text_encoder", "text_encoder_2")


class TextConditioning:
    def __init__(self, pipeline: DiffusionPipeline, family: Family):
        self.family = family
        self.two_encoders = family.name == "sdxl"
        names = TEXT_ENCODER_NAMES if self.two_encoders else TEXT_ENCODER_NAMES[:1]
        self.encoders: dict[str, torch.nn.Module] = {name: getattr(pipeline, name) for name in names}
        self.tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2] if self.two_encoders else [pipeline.tokenizer]

    def unet_inputs(
        self, forwards: dict[str, torch.nn.Module], batch: dict[str, torch.Tensor], device: torch.device,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """(encoder_hidden_states, added_cond_kwargs) for the UNet; `forwards` are the encoders to run (the
        accelerate-wrapped ones when trained)."""
        if not self.two_encoders:
            return forwards["text_encoder"](batch["input_ids"].to(device), return_dict=False)[0], None
        first = forwards["text_encoder"](batch["input_ids"].to(device), output_hidden_states=True)
        second = forwards["text_encoder_2"](batch["input_ids_2"].to(device), output_hidden_states=True)
        hidden_states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        added = {"text_embeds": second.text_embeds.to(dtype), "time_ids": batch["time_ids"].to(device, dtype)}
        return hidden_states.to(dtype), added
