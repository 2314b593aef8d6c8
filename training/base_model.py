"""The base a run trains on: a registry name or a path, loaded through the server's own pipeline code.

Loading goes through `models.engine.pipelines.PipelineCache`, so training accepts exactly the sources the server does
(demo builtins, diffusers folders, Hugging Face ids in the local cache, single .safetensors files) with the same
error messages, and validation / class images are rendered by `models.engine.generate.generate`, the function that
serves requests: what a run shows is what the server will show.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from models.engine.device import DeviceConfig
from models.engine.generate import generate
from models.engine.loras import LoraAdapters, LoraResolver
from models.engine.pipelines import LoadedModel, PipelineCache
from models.errors import InvalidRequest, ModelNotFound
from models.families import FAMILIES, family_named
from models.registry import BASE_KINDS, Registry, RegistryEntry
from models.settings import Settings
from models.shapes import NATIVE_SIZE
from models.types import GenerationRequest
from training.shapes_model import build_untrained_pipeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseChoice:
    """What --base named: a registry entry (`name` set) or a path on disk (`name` None)."""

    requested: str
    name: str | None
    entry: RegistryEntry

    @property
    def label(self) -> str:
        return self.name or self.entry.source


def resolve_base(base: str, registry: Registry) -> BaseChoice:
    """A registered base model by name, else an existing folder or file; ModelNotFound lists the names."""
    entries = registry.entries()
    entry = entries.get(base)
    if entry is not None and entry.kind in BASE_KINDS:
        return BaseChoice(requested=base, name=base, entry=entry)
    path = Path(base).expanduser()
    if entry is None and path.exists():
        return BaseChoice(requested=base, name=None, entry=RegistryEntry(kind="base", source=str(path.resolve())))
    raise ModelNotFound(base, registry.names(BASE_KINDS))


class _OneBase:
    """The registry interface PipelineCache reads (`get`), answering for the one base of this run."""

    def __init__(self, name: str, entry: RegistryEntry):
        self._name, self._entry = name, entry

    def get(self, name: str, kinds: tuple[str, ...] | None = None) -> RegistryEntry:
        if name != self._name:
            raise ModelNotFound(name, [self._name])
        return self._entry


def load_base(choice: BaseChoice, settings: Settings, device: torch.device) -> tuple[DiffusionPipeline, LoadedModel]:
    """The base pipeline in float32 on `device`; the training loop casts frozen parts to its precision."""
    name = choice.name or "base"
    config = DeviceConfig(device=device, dtype=torch.float32, use_xformers=False, low_memory=False)
    cache = PipelineCache(settings, _OneBase(name, choice.entry), config)  # type: ignore[arg-type]
    model = cache.load(name)
    if not model.family.training:
        trainable = " and ".join(family.label for family in FAMILIES.values() if family.training)
        raise InvalidRequest(f"base {choice.label!r} is a {model.family.label} model; these scripts train "
                             f"{trainable} bases")
    pipeline, model = cache.get(name, "text2img")
    return pipeline, model


def scratch_base(
    architecture: str, seed: int, device: torch.device, settings: Settings, registry: Registry
) -> tuple[BaseChoice, DiffusionPipeline, LoadedModel]:
    """New random weights of a named architecture (training/shapes_model.py), as a base the loop trains."""
    source = f"scratch:{architecture}"
    pipeline = build_untrained_pipeline(architecture, seed).to(device)
    pipeline.set_progress_bar_config(disable=True)
    entry = RegistryEntry(kind="base", source=source)
    # A loaded scheduler's config names its class; a new one's does not until saved, and the engine needs it.
    scheduler_config = {**pipeline.scheduler.config, "_class_name": type(pipeline.scheduler).__name__}
    model = LoadedModel(name=source, entry=entry, pipelines={"text2img": pipeline}, scheduler_config=scheduler_config,
                        weight_bytes=0, load_seconds=0.0, family=family_named("sd"), native_size=NATIVE_SIZE,
                        loras=LoraAdapters(source, pipeline, LoraResolver(settings, registry), settings.max_loras))
    return BaseChoice(requested=source, name=None, entry=entry), pipeline, model


def weights_sha256(*modules: torch.nn.Module) -> str:
    """sha256 over the parameters and buffers as loaded (names, dtypes, shapes, bytes): the same for any file format."""
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().to("cpu").contiguous()
            digest.update(f"{key}:{data.dtype}:{tuple(data.shape)}".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def make_renderer(
    pipeline: DiffusionPipeline, model: LoadedModel
) -> Callable[[str, int, int, int, float, int], list[Image.Image]]:
    """render(prompt, seed, size, steps, guidance, count): images through the serving path (models.engine.generate)."""

    def render(prompt: str, seed: int, size: int, steps: int, guidance: float, count: int) -> list[Image.Image]:
        request = GenerationRequest(
            task="text2img", prompt=prompt, width=size, height=size, steps=steps, guidance_scale=guidance,
            num_images=count, seed=seed,
        )
        return generate(pipeline, model, request, on_step=lambda step, total: None, is_cancelled=lambda: False).images

    return render
