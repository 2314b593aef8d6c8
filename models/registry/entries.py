"""A registry entry: what a name in `registry.yaml` stands for. Plain data, shared by the engine and its clients."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

ModelKind = Literal["base", "lora", "dreambooth", "controlnet"]
BASE_KINDS: tuple[str, ...] = ("base", "dreambooth")
# Model families (architectures): what a base, or the base of an adapter, is. models/families.py says what each
# one supports.
FamilyName = Literal["sd", "sdxl", "sdxl-refiner", "sd3", "flux"]
FAMILY_NAMES: tuple[str, ...] = ("sd", "sdxl", "sdxl-refiner", "sd3", "flux")


class RegistryEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: ModelKind = "base"
    source: str = Field(min_length=1, description="demo:NAME, HF repo id, local folder or single file")
    base: str | None = Field(None, description="Base model name, for adapters")
    weight_name: str | None = Field(None, description="File inside a folder or repo, when not the default")
    config: str | None = Field(None, description="Diffusers config folder or repo for single-file checkpoints")
    family: FamilyName | None = Field(
        None, description="sd, sdxl, sdxl-refiner, sd3 or flux; default: detected from the model's files"
    )
    scale: float = Field(1.0, description="Default adapter scale")
    trigger_words: list[str] = Field(default_factory=list)
    sha256: str | None = None
    created_by: str | None = Field(None, description="Training run id that produced this entry")
    created_at: datetime | None = None
    description: str | None = None
    guidance: float | None = Field(
        None, ge=0, le=50, description="Guidance for requests that give none (cfg_scale); default: the family's "
        "(SD 1.x 7, SDXL 5, FLUX 3.5)",
    )
    backend: Literal["torch", "openvino"] | None = Field(
        None, description="How this base runs (torch or openvino); default: the server's SDSERVE_BACKEND"
    )
