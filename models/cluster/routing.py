"""What a request is routed by: Ray Serve's multiplexed model id, sent with every call for one model, so Serve
prefers a replica that already has that model (and those LoRAs) loaded and loads it on another only as a fallback."""

from __future__ import annotations

from models.types import GenerationRequest

LORA_SEPARATOR = "+"


def model_id(model: str, loras: tuple[str, ...] = ()) -> str:
    """`demo`, or `demo+lora-a,lora-b` (the LoRA names sorted: their order does not change what is loaded)."""
    names = sorted(set(loras))
    return f"{model}{LORA_SEPARATOR}{','.join(names)}" if names else model


def base_model(multiplexed_id: str) -> str:
    return multiplexed_id.split(LORA_SEPARATOR, 1)[0]


def request_model_id(request: GenerationRequest, default_model: str) -> str:
    return model_id(request.model or default_model, tuple(lora.name for lora in request.loras))
