"""Request and response models for ControlNet: the `controlnet` field of generation requests and the loaded
ControlNets (seed 003's routes in api/compat/seeds.py build on these)."""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from api.images import Base64Image
from models.types import ControlNetInfo, ControlNetSpec, ControlNetUse


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
    guidance_start: float = Field(0.0, ge=0, lt=1, description="Fraction of the steps after which it starts.")
    guidance_end: float = Field(1.0, gt=0, le=1, description="Fraction of the steps after which it stops.")
    guess_mode: bool = Field(
        False, description="Steer the conditional half of guidance only, shallow blocks weaker (diffusers' guess "
        "mode; A1111's \"ControlNet is more important\"). The same for every ControlNet of a request.",
    )

    def to_spec(self) -> ControlNetSpec:
        return ControlNetSpec(name=self.name, image=self.image, scale=self.scale, guidance_start=self.guidance_start,
                              guidance_end=self.guidance_end, guess_mode=self.guess_mode)


class ControlNetUsed(BaseModel):
    name: str = Field(description="The ControlNet as the request named it.")
    scale: float = Field(description="The conditioning scale it ran at.")
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    guess_mode: bool = False

    @classmethod
    def from_domain(cls, used: ControlNetUse | None) -> ControlNetUsed | None:
        return None if used is None else cls(name=used.name, scale=used.scale, guidance_start=used.guidance_start,
                                             guidance_end=used.guidance_end, guess_mode=used.guess_mode)

    @classmethod
    def echo(cls, used: tuple[ControlNetUse, ...]) -> ControlNetUsed | list[ControlNetUsed] | None:
        """As the request had it: one ControlNet as an object, several as a list."""
        items = [cls.from_domain(item) for item in used]
        return None if not items else items[0] if len(items) == 1 else items  # type: ignore[return-value]


class LoadedControlNet(BaseModel):
    name: str = Field(description="The name to use it by (model_key of /unload-controlnet/).")
    source: str = Field(description="What it was loaded from.")
    preloaded: bool = Field(description="Loaded through /load-controlnet/ (else by a request naming it).")
    uses: int = Field(description="Generations that ran with it.")

    @classmethod
    def from_domain(cls, info: ControlNetInfo) -> LoadedControlNet:
        return cls(name=info.name, source=info.source, preloaded=info.preloaded, uses=info.uses)
