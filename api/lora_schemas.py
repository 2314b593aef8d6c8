"""Request and response models of the LoRA routes (/loras, seed 003's /load-lora/) and /pipeline-state."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from models.registry import RegistryEntry
from models.sources import ADAPTER_NAME_PATTERN
from models.types import LoraInfo, LoraSpec, ModelState


class LoadLoraBody(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(
        min_length=1, max_length=1000, validation_alias=AliasChoices("name", "path", "lora_path", "source"),
        description="A registry entry of kind lora, a local file or folder inside the allowed folders "
        "(a folder of training checkpoints loads the highest step), or a Hugging Face repo id in the local cache.",
    )
    weight_name: str | None = Field(None, min_length=1, max_length=255, description="The file inside a folder.")
    adapter_name: str | None = Field(
        None, pattern=ADAPTER_NAME_PATTERN,
        description="Name for the loaded adapter; requests can then use it as a LoRA name. Default: from the file.",
    )
    scale: float | None = Field(
        None, ge=-10, le=10, validation_alias=AliasChoices("scale", "lora_scale"),
        description="Default scale for requests that name this adapter; default: the registry's, else 1.",
    )
    model: str | None = Field(None, description="Base model to load it into; default SDSERVE_DEFAULT_MODEL.")

    def to_spec(self) -> LoraSpec:
        return LoraSpec(name=self.name, weight_name=self.weight_name)


class LoadedLora(BaseModel):
    model: str = Field(description="The base model the adapter is loaded into.")
    adapter_name: str = Field(description="Its name in the pipeline; DELETE /loras/{adapter_name} unloads it.")
    name: str = Field(description="The reference it was loaded from (registry name, path or repo id).")
    file: str = Field(description="The weight file that was read.")
    scale: float = Field(description="Default scale when a request names the adapter without one.")
    trigger_words: list[str]
    preloaded: bool = Field(description="Loaded through POST /loras: its adapter name works as a LoRA name.")
    loaded_at: datetime
    uses: int = Field(description="Requests that used it since it was loaded.")

    @classmethod
    def from_domain(cls, model: str, info: LoraInfo) -> LoadedLora:
        return cls(model=model, adapter_name=info.adapter_name, name=info.reference, file=info.file,
                   scale=info.scale, trigger_words=list(info.trigger_words), preloaded=info.preloaded,
                   loaded_at=datetime.fromtimestamp(info.loaded_at, tz=timezone.utc), uses=info.uses)


class RegisteredLora(BaseModel):
    name: str
    source: str
    base: str | None
    weight_name: str | None
    scale: float
    trigger_words: list[str]
    description: str | None

    @classmethod
    def from_entry(cls, name: str, entry: RegistryEntry) -> RegisteredLora:
        return cls(name=name, **entry.model_dump(include={"source", "base", "weight_name", "scale", "trigger_words",
                                                          "description"}))


class LoraList(BaseModel):
    loaded: dict[str, list[LoadedLora]] = Field(description="Loaded adapters by base model, least recently used first.")
    registered: list[RegisteredLora] = Field(description="LoRAs in the registry (kind lora), loaded or not.")
    max_per_model: int = Field(description="Adapters kept per base model (SDSERVE_MAX_LORAS).")


class UnloadedLoras(BaseModel):
    unloaded: dict[str, list[str]] = Field(description="Adapter names unloaded, by base model.")


class AppliedLora(BaseModel):
    adapter_name: str
    scale: float


class PipelineDescription(BaseModel):
    task: str
    pipeline_class: str
    scheduler: str


class ModelPipelineState(BaseModel):
    name: str
    pipelines: list[PipelineDescription] = Field(description="text2img, and the derived pipelines loaded so far.")
    weights_mb: float
    loaded_at: datetime
    loras: list[LoadedLora]
    applied_loras: list[AppliedLora] = Field(description="The adapters the last request on this model ran with.")
    applied_controlnets: list[str] = Field(
        default_factory=list, description="The ControlNets the last request on this model ran with (none: [])."
    )

    @classmethod
    def from_domain(cls, state: ModelState) -> ModelPipelineState:
        return cls(
            name=state.name,
            pipelines=[PipelineDescription(task=p.task, pipeline_class=p.pipeline_class, scheduler=p.scheduler)
                       for p in state.pipelines],
            weights_mb=round(state.weight_bytes / 2**20, 1),
            loaded_at=datetime.fromtimestamp(state.loaded_at, tz=timezone.utc),
            loras=[LoadedLora.from_domain(state.name, info) for info in state.loras],
            applied_loras=[AppliedLora(adapter_name=name, scale=scale) for name, scale in state.applied_loras],
            applied_controlnets=list(state.applied_controlnets),
        )


class PipelineState(BaseModel):
    base_model: str | None = Field(description="The most recently used loaded base model (seed 003's field).")
    scheduler: str | None = Field(description="Scheduler of its text2img pipeline after the last request.")
    derived_pipelines: list[str] = Field(description="Its task pipelines derived from the base (img2img, ...).")
    loaded_adapters: list[str] = Field(description="Adapter names loaded into it.")
    controlnet_attached: bool = Field(
        False, description="Seed 003's question: did its last generation run with a ControlNet attached?"
    )
    controlnets: list[str] = Field(default_factory=list, description="Which ControlNets (several: multi-ControlNet).")
    device: str
    dtype: str
    attention: str
    default_model: str
    models: list[ModelPipelineState] = Field(description="Every loaded base, most recently used first.")

    @classmethod
    def build(cls, states: list[ModelState], device: dict[str, str], default_model: str) -> PipelineState:
        models = [ModelPipelineState.from_domain(state) for state in states]
        current = models[0] if models else None
        text2img = next((p for p in current.pipelines if p.task == "text2img"), None) if current else None
        return cls(
            base_model=current.name if current else None,
            scheduler=text2img.scheduler if text2img else None,
            derived_pipelines=[p.task for p in current.pipelines if p.task != "text2img"] if current else [],
            loaded_adapters=[lora.adapter_name for lora in current.loras] if current else [],
            controlnet_attached=bool(current and current.applied_controlnets),
            controlnets=list(current.applied_controlnets) if current else [],
            device=str(device["device"]),
            dtype=str(device["dtype"]),
            attention=str(device["attention"]),
            default_model=default_model,
            models=models,
        )
