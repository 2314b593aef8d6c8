"""Loading base models and keeping them: one load per base, derived task pipelines, an LRU bound.

Only the generation worker thread calls into this module (jobs, and administration calls between jobs), so it
needs no locking of its own.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from models import metrics
from models.engine.backends import apply_backend, backend_for
from models.engine.controlnets import ControlNets
from models.engine.device import DeviceConfig
from models.engine.families import family_of_pipeline, native_size
from models.engine.loras import LoraAdapters, LoraResolver
from models.errors import AdapterNotFound, InvalidRequest, ModelUnavailable
from models.families import FAMILIES, Family, family_of_checkpoint_keys
from models.registry import BASE_KINDS, Registry, RegistryEntry, builtins
from models.registry.detect import safetensors_keys
from models.settings import Settings
from models.sources import looks_like_path, pickle_refusal
from models.tasks import task_spec
from models.types import ControlNetInfo, LoraInfo, LoraSpec, ModelState, PipelineInfo

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    entry: RegistryEntry
    pipelines: dict[str, DiffusionPipeline]
    scheduler_config: Any
    weight_bytes: int
    load_seconds: float
    loras: LoraAdapters  # the LoRAs loaded into this base, shared by its derived pipelines
    family: Family
    native_size: int  # the size it was trained at: the default output size
    loaded_task: str = "text2img"  # the task of the pipeline it was loaded as (an SDXL refiner loads as img2img)
    loaded_at: float = field(default_factory=time.time)

    @property
    def base(self) -> DiffusionPipeline:
        """The pipeline the model was loaded as; the other tasks' pipelines are derived from it."""
        return self.pipelines[self.loaded_task]

    def default_size(self) -> tuple[int, int]:
        return self.native_size, self.native_size


class PipelineCache:
    def __init__(self, settings: Settings, registry: Registry, device: DeviceConfig):
        self.settings = settings
        self.registry = registry
        self.device = device
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        # The loaded names, replaced whole at every change: other threads (health) read it without a lock.
        self.loaded_now: tuple[str, ...] = ()
        self._last_used: str | None = None
        self.controlnets = ControlNets(settings, registry, device)
        # Loading bars are for notebooks; a server logs one line per load instead.
        diffusers_logging.disable_progress_bar()

    def loaded_names(self) -> list[str]:
        return list(self._models)

    def loaded(self) -> list[LoadedModel]:
        return list(self._models.values())

    def get(
        self, name: str, task: str, controlnets: tuple[str, ...] = (), keep: tuple[str, ...] = ()
    ) -> tuple[DiffusionPipeline, LoadedModel]:
        """The pipeline for `task` on base `name`, loading the base or deriving the task pipeline once; with
        ControlNet names, the ControlNet variant of that pipeline on the same components (several: diffusers'
        multi-ControlNet). Loading never unloads the models named in `keep` (the base of a job whose refiner this
        is)."""
        model = self.load(name, keep)
        if task not in model.family.tasks:
            raise InvalidRequest(f"model {name!r} ({model.family.label}) does not do {task}; it does "
                                 + ", ".join(model.family.tasks))
        self.controlnets.applied[name] = controlnets
        if controlnets:
            return self.controlnets.pipeline_for(model.base, name, task, controlnets), model
        if task not in model.pipelines:
            model.pipelines[task] = self._derive(model, task)
        return model.pipelines[task], model

    def load(self, name: str, keep: tuple[str, ...] = ()) -> LoadedModel:
        """Base `name`, loaded once and kept as the most recently used."""
        model = self._models.get(name)
        if model is None:
            entry = self.registry.get(name, kinds=BASE_KINDS)
            model = self._load(name, entry)
            self._models[name] = model
            self._enforce_bounds(keep=(name, *keep))
            metrics.model_loaded(name, model.load_seconds, len(self._models))
        self._models.move_to_end(name)
        self.loaded_now = tuple(self._models)
        if self._last_used is not None and self._last_used != name:
            metrics.model_switched(name)
        self._last_used = name
        return model

    def evict(self, name: str) -> bool:
        model = self._models.pop(name, None)
        if model is None:
            return False
        self.loaded_now = tuple(self._models)
        logger.info("unloading model %r (%.0f MB)", name, model.weight_bytes / 2**20)
        self.controlnets.forget_model(name)
        metrics.model_evicted(name, len(self._models))
        model.pipelines.clear()
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return True

    # -- administration between jobs: LoRAs and ControlNets loaded ahead, what is loaded where ------------------
    def preload_lora(self, model_name: str, spec: LoraSpec, adapter_name: str | None, scale: float | None) -> LoraInfo:
        model = self.load(model_name)
        if not model.family.lora_layouts:
            raise InvalidRequest(f"model {model_name!r} ({model.family.label}) does not take LoRAs here")
        return model.loras.preload(spec, adapter_name, scale)

    def unload_lora(self, name: str, model_name: str | None = None) -> dict[str, list[str]]:
        """Unload a LoRA (by adapter name or the reference it was loaded with) from one base or from all."""
        unloaded: dict[str, list[str]] = {}
        for model in self.loaded():
            if model_name in (None, model.name):
                names = model.loras.unload(name)
                if names:
                    unloaded[model.name] = names
        if not unloaded:
            loaded = sorted({lora.adapter_name for model in self.loaded() for lora in model.loras.loaded()})
            where = f" on model {model_name!r}" if model_name else ""
            raise AdapterNotFound(f"no LoRA {name!r} is loaded{where}; loaded: {', '.join(loaded) or 'none'}")
        return unloaded

    def loaded_loras(self) -> dict[str, list[LoraInfo]]:
        return {model.name: model.loras.loaded() for model in self.loaded()}

    def preloaded_lora_names(self, model_name: str) -> list[str]:
        """Adapter names loaded ahead (POST /loras) on a base: seed 003 applies them to every generation after."""
        model = self._models.get(model_name)
        return [info.adapter_name for info in model.loras.loaded() if info.preloaded] if model else []

    def preload_controlnet(self, source: str, name: str | None, check_model: str) -> ControlNetInfo:
        """Load a ControlNet ahead, refused now if it does not fit `check_model`'s UNet."""
        return self.controlnets.preload(source, name, check_against=(check_model, self.load(check_model).base))

    def state(self) -> list[ModelState]:
        """Every loaded base, most recently used first, with its task pipelines, schedulers and adapters."""
        return [
            ModelState(
                name=model.name,
                pipelines=tuple(PipelineInfo(task, type(pipeline).__name__, type(pipeline.scheduler).__name__)
                                for task, pipeline in model.pipelines.items()),
                weight_bytes=model.weight_bytes,
                loaded_at=model.loaded_at,
                loras=tuple(model.loras.loaded()),
                applied_loras=tuple(model.loras.applied()),
                applied_controlnets=self.controlnets.applied.get(model.name, ()),
            )
            for model in reversed(self.loaded())
        ]

    def _enforce_bounds(self, keep: tuple[str, ...]) -> None:
        budget = self.settings.memory_budget_gb
        while len(self._models) > 1:
            total = sum(model.weight_bytes for model in self._models.values())
            over_count = len(self._models) > self.settings.max_loaded_models
            over_budget = budget is not None and total > budget * 2**30
            if not (over_count or over_budget):
                return
            oldest = next((name for name in self._models if name not in keep), None)
            if oldest is None:  # everything loaded is in use by this job: over the bound until it ends
                return
            self.evict(oldest)

    # -- loading -------------------------------------------------------------------------------------------
    def _load(self, name: str, entry: RegistryEntry) -> LoadedModel:
        started = time.perf_counter()
        logger.info("loading model %r from %s", name, entry.source)
        pipeline = self._from_source(name, entry)
        family = family_of_pipeline(pipeline, entry.family)
        pipeline = self._place(pipeline)
        # The backend hook: placed and typed, before any LoRA is loaded (models/engine/backends.py says why).
        apply_backend(pipeline, backend_for(entry.backend, self.settings.backend), self.device.device,
                      self.settings.cache_dir, name)
        pipeline.set_progress_bar_config(disable=True)
        seconds = time.perf_counter() - started
        weights = _weight_bytes(pipeline)
        builtin = builtins.BUILDERS.get(entry.source.removeprefix("demo:"))
        size = (builtin.native_size if builtin and entry.source.startswith("demo:") else None) or native_size(pipeline)
        loaded_task = "text2img" if "text2img" in family.tasks else family.tasks[0]
        logger.info("model %r (%s) loaded in %.1fs (%.0f MB of weights, native size %d)", name, family.label,
                    seconds, weights / 2**20, size)
        return LoadedModel(
            name=name,
            entry=entry,
            pipelines={loaded_task: pipeline},
            family=family,
            native_size=size,
            loaded_task=loaded_task,
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
                if builtin not in builtins.BUILDERS:
                    raise ModelUnavailable(
                        f"model {name!r}: unknown builtin {source!r}; builtins: "
                        + ", ".join(f"demo:{b}" for b in builtins.builtin_names())
                    )
                folder = builtins.ensure_builtin(builtin, self.settings.cache_dir)
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
            if looks_like_path(source):
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
        refusal = pickle_refusal(path, self.settings, f"model {name!r}")
        if refusal:
            raise ModelUnavailable(refusal)
        if entry.config:
            options["config"] = entry.config
        family = self._single_file_family(name, entry, path)
        pipeline_class = getattr(diffusers, family.single_file_class)
        logger.info("model %r: %s is a %s checkpoint; loading it with %s.from_single_file", name, path.name,
                    family.label, pipeline_class.__name__)
        return pipeline_class.from_single_file(str(path), local_files_only=not self.settings.allow_downloads,
                                               **options)

    @staticmethod
    def _single_file_family(name: str, entry: RegistryEntry, path: Path) -> Family:
        """The entry's family, else the one the checkpoint's tensor names show (safetensors only: a pickle's
        names cannot be read without running it); SD 1.x when nothing tells, as before families existed."""
        if entry.family is not None:
            return FAMILIES[entry.family]
        if path.suffix != ".safetensors":
            return FAMILIES["sd"]
        detected = family_of_checkpoint_keys(safetensors_keys(path))
        if detected is None:
            raise ModelUnavailable(
                f"model {name!r}: {path.name} is not a checkpoint this server recognises (SD 1.x/2.x, SDXL, SDXL "
                "refiner, SD 3.x or FLUX in the original layout); set `family` in its registry entry"
            )
        return FAMILIES[detected]

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
        if self.settings.batch_max_images > 1 and getattr(pipeline, "vae", None) is not None:
            # One image at a time through the VAE: a batched decode rounds differently, and an image should not
            # depend on which requests shared its pipeline call.
            pipeline.vae.enable_slicing()
        return pipeline

    def _derive(self, model: LoadedModel, task: str) -> DiffusionPipeline:
        """img2img and inpainting pipelines share the base's components: no second copy of the weights."""
        try:
            derived = task_spec(task).pipeline_class.from_pipe(model.base)
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
