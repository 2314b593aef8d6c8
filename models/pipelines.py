"""Loading base models and keeping them: one load per base, derived task pipelines, an LRU bound.

Only the generation worker calls into this module, so it needs no locking of its own.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    DiffusionPipeline,
    StableDiffusionPipeline,
)
from diffusers.utils import logging as diffusers_logging

from models import demo, metrics
from models.adapters import PICKLE_SUFFIXES, LoraAdapters, LoraResolver
from models.backends import apply_backend, backend_for
from models.controlnets import ControlNets
from models.device import DeviceConfig
from models.errors import InvalidRequest, ModelUnavailable
from models.registry import BASE_KINDS, Registry, RegistryEntry
from models.settings import Settings

logger = logging.getLogger(__name__)

TASKS = ("text2img", "img2img", "inpainting")
SINGLE_FILE_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


@dataclass
class LoadedModel:
    name: str
    entry: RegistryEntry
    pipelines: dict[str, DiffusionPipeline]
    scheduler_config: Any
    weight_bytes: int
    load_seconds: float
    loaded_at: float = field(default_factory=time.time)
    loras: LoraAdapters | None = None  # the LoRAs loaded into this base, shared by its derived pipelines

    @property
    def base(self) -> DiffusionPipeline:
        return self.pipelines["text2img"]

    def default_size(self) -> tuple[int, int]:
        unet = self.base.unet
        size = unet.config.sample_size * self.base.vae_scale_factor
        return size, size


class PipelineCache:
    def __init__(self, settings: Settings, registry: Registry, device: DeviceConfig):
        self.settings = settings
        self.registry = registry
        self.device = device
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._last_used: str | None = None
        self.controlnets = ControlNets(settings, registry, device)
        # Loading bars are for notebooks; a server logs one line per load instead.
        diffusers_logging.disable_progress_bar()

    def loaded_names(self) -> list[str]:
        return list(self._models)

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def get(self, name: str, task: str, controlnet: str | None = None) -> tuple[DiffusionPipeline, LoadedModel]:
        """The pipeline for `task` on base `name`, loading the base or deriving the task pipeline once; with a
        `controlnet` name, the ControlNet variant of that pipeline on the same components."""
        model = self._models.get(name)
        if model is None:
            entry = self.registry.get(name, kinds=BASE_KINDS)
            model = self._load(name, entry)
            self._models[name] = model
            self._enforce_bounds(keep=name)
            metrics.model_loaded(name, model.load_seconds, len(self._models))
        self._models.move_to_end(name)
        if self._last_used is not None and self._last_used != name:
            metrics.model_switched(name)
        self._last_used = name
        if controlnet is not None:
            return self.controlnets.pipeline_for(model, task, controlnet), model
        if task not in model.pipelines:
            model.pipelines[task] = self._derive(model, task)
        return model.pipelines[task], model

    def evict(self, name: str) -> bool:
        model = self._models.pop(name, None)
        if model is None:
            return False
        logger.info("unloading model %r (%.0f MB)", name, model.weight_bytes / 2**20)
        self.controlnets.forget_model(name)
        metrics.model_evicted(name, len(self._models))
        model.pipelines.clear()
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    def _enforce_bounds(self, keep: str) -> None:
        budget = self.settings.memory_budget_gb
        while len(self._models) > 1:
            total = sum(model.weight_bytes for model in self._models.values())
            over_count = len(self._models) > self.settings.max_loaded_models
            over_budget = budget is not None and total > budget * 2**30
            if not (over_count or over_budget):
                return
            oldest = next(name for name in self._models if name != keep)
            self.evict(oldest)

    # -- loading -------------------------------------------------------------------------------------------
    def _load(self, name: str, entry: RegistryEntry) -> LoadedModel:
        started = time.perf_counter()
        logger.info("loading model %r from %s", name, entry.source)
        pipeline = self._from_source(name, entry)
        pipeline = self._place(pipeline)
        # The backend hook: placed and typed, before any LoRA is loaded (models/backends.py says why).
        apply_backend(pipeline, backend_for(entry.backend, self.settings.backend), self.device.device,
                      self.settings.cache_dir, name)
        pipeline.set_progress_bar_config(disable=True)
        seconds = time.perf_counter() - started
        weights = _weight_bytes(pipeline)
        logger.info("model %r loaded in %.1fs (%.0f MB of weights)", name, seconds, weights / 2**20)
        return LoadedModel(
            name=name,
            entry=entry,
            pipelines={"text2img": pipeline},
            scheduler_config=pipeline.scheduler.config,
            weight_bytes=weights,
            load_seconds=seconds,
            loras=LoraAdapters(
                name, pipeline, LoraResolver(self.settings, self.registry), self.settings.max_loras
            ),
        )

    def _from_source(self, name: str, entry: RegistryEntry) -> DiffusionPipeline:
        source = entry.source
        options: dict[str, Any] = {"dtype": self.device.dtype}
        try:
            if source.startswith("demo:"):
                builtin = source.removeprefix("demo:")
                if builtin not in demo.BUILDERS:
                    raise ModelUnavailable(
                        f"model {name!r}: unknown builtin {source!r}; builtins: "
                        + ", ".join(f"demo:{b}" for b in demo.builtin_names())
                    )
                folder = demo.ensure_builtin(builtin, self.settings.cache_dir)
                return DiffusionPipeline.from_pretrained(folder, **options)
            path = Path(source).expanduser()
            if path.is_file():
                return self._from_single_file(name, entry, path, options)
            if path.is_dir():
                if not (path / "model_index.json").exists():
                    raise ModelUnavailable(
                        f"model {name!r}: {path} is not a diffusers folder (no model_index.json)"
                    )
                return DiffusionPipeline.from_pretrained(path, **options)
            if source.startswith(("/", "./", "../", "~")) or source.endswith(SINGLE_FILE_SUFFIXES):
                raise ModelUnavailable(f"model {name!r}: no file or folder at {source}")
            return DiffusionPipeline.from_pretrained(
                source, local_files_only=not self.settings.allow_downloads, **options
            )
        except ModelUnavailable:
            raise
        except (OSError, ValueError) as error:
            logger.warning("model %r could not be loaded: %s", name, error)
            raise ModelUnavailable(_unavailable_message(name, source, self.settings.allow_downloads)) from error

    def _from_single_file(
        self, name: str, entry: RegistryEntry, path: Path, options: dict[str, Any]
    ) -> DiffusionPipeline:
        if path.suffix in PICKLE_SUFFIXES and not self.settings.allow_pickle:
            raise ModelUnavailable(
                f"model {name!r}: {path.name} is a pickle checkpoint, which can run code when loaded; "
                "convert it to .safetensors or set SDSERVE_ALLOW_PICKLE=true"
            )
        if entry.config:
            options["config"] = entry.config
        return StableDiffusionPipeline.from_single_file(
            str(path), local_files_only=not self.settings.allow_downloads, **options
        )

    def _place(self, pipeline: DiffusionPipeline) -> DiffusionPipeline:
        if self.device.low_memory and self.device.device.type == "cuda":
            pipeline.enable_model_cpu_offload()
        else:
            pipeline.to(self.device.device)
        if self.device.low_memory:
            pipeline.enable_attention_slicing()
            if hasattr(pipeline, "vae"):
                pipeline.vae.enable_tiling()
        if self.device.use_xformers:
            pipeline.enable_xformers_memory_efficient_attention()
        return pipeline

    def _derive(self, model: LoadedModel, task: str) -> DiffusionPipeline:
        """img2img and inpainting pipelines share the base's components: no second copy of the weights."""
        if task not in TASKS:
            raise InvalidRequest(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
        factory = {"img2img": AutoPipelineForImage2Image, "inpainting": AutoPipelineForInpainting}[task]
        try:
            derived = factory.from_pipe(model.base)
        except ValueError as error:
            raise InvalidRequest(f"model {model.name!r} does not support {task}: {error}") from error
        derived.set_progress_bar_config(disable=True)
        logger.info("derived %s pipeline %s for model %r", task, type(derived).__name__, model.name)
        return derived


def _weight_bytes(pipeline: DiffusionPipeline) -> int:
    total = 0
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in component.parameters())
    return total


def _unavailable_message(name: str, source: str, downloads_allowed: bool) -> str:
    if downloads_allowed:
        return f"model {name!r} ({source}) could not be loaded; check the source in the registry"
    return (
        f"model {name!r} ({source}) is not available offline. Download it once with "
        f"`hf download {source}` (into HF_HOME), point its registry source at a local "
        "diffusers folder, or start the server with SDSERVE_ALLOW_DOWNLOADS=true"
    )
