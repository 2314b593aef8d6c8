"""Request and response models for ControlNet: the `controlnet` field of generation requests and seed 003's
/load-controlnet/, /active-controlnets/ and /unload-controlnet/ routes."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from api.images import Base64Image
from models.controlnets import ControlNetInfo, ControlNetSpec


class ControlNetBody(BaseModel):
    """A ControlNet for one generation: which one, its control image, and how strongly it steers."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)

    name: str = Field(
        min_length=1, max_length=1000, validation_alias=AliasChoices("name", "model"),
        description="A registry entry of kind controlnet, or a name loaded with POST /load-controlnet/.",
    )
    image: Base64Image = Field(
        validation_alias=AliasChoices("image", "control_image"),
        description="The control image (edges, depth, pose, ...), base64 or a data URL; resized to the output.",
    )
    scale: float = Field(
        1.0, ge=0, le=5, validation_alias=AliasChoices("scale", "conditioning_scale"),
        description="How strongly the ControlNet steers (controlnet_conditioning_scale); 0 gives the plain image.",
    )

    def to_spec(self) -> ControlNetSpec:
        return ControlNetSpec(name=self.name, scale=self.scale)


class ControlNetUsed(BaseModel):
    name: str = Field(description="The ControlNet as the request named it.")
    scale: float = Field(description="The conditioning scale it ran at.")

    @classmethod
    def from_domain(cls, spec: ControlNetSpec | None) -> ControlNetUsed | None:
        return None if spec is None else cls(name=spec.name, scale=spec.scale)


class LoadControlNetCompatBody(BaseModel):
    """Seed 003's /load-controlnet/ fields, as JSON, form fields or query parameters."""

    model_config = ConfigDict(extra="ignore")

    controlnet_path: str = Field(
        min_length=1, max_length=1000,
        description="A registry name (kind controlnet), a diffusers ControlNet folder inside the allowed folders, "
        "or a Hugging Face repo id in the local cache.",
    )
    adapter_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,100}$", description="Name to use it by; default: controlnet_path."
    )
    lora_weights_path: str | None = Field(None, description="ControlLoRA weights: not supported (422).")
    torch_dtype: Literal["float16", "float32", "bfloat16"] | None = Field(
        None, description="Accepted for seed 003 clients and ignored: the server's device decides the dtype."
    )


class LoadedControlNet(BaseModel):
    name: str = Field(description="The name to use it by (model_key of /unload-controlnet/).")
    source: str = Field(description="What it was loaded from.")
    preloaded: bool = Field(description="Loaded through /load-controlnet/ (else by a request naming it).")
    uses: int = Field(description="Generations that ran with it.")

    @classmethod
    def from_domain(cls, info: ControlNetInfo) -> LoadedControlNet:
        return cls(name=info.name, source=info.source, preloaded=info.preloaded, uses=info.uses)


class LoadControlNetCompatResponse(LoadedControlNet):
    message: str


class ActiveControlNets(BaseModel):
    active_controlnets: list[str] = Field(description="Names of the loaded ControlNets, least recently used first.")
    controlnets: list[LoadedControlNet]


class UnloadControlNetResponse(BaseModel):
    status: Literal["success"] = "success"
    message: str
