"""ControlNets at serving time: load once, keep a few, derive ControlNet pipelines that share the base's weights.

A request names a ControlNet (a registry entry of kind `controlnet`, or a name given to one loaded ahead through
seed 003's /load-controlnet/) and sends a control image. The worker loads the ControlNet once (bounded by
SDSERVE_MAX_CONTROLNETS, least recently used unloaded), checks that it fits the base's UNet, and runs the
request on the task's ControlNet pipeline (AutoPipeline's `from_pipe(base, controlnet=...)`): the UNet, VAE and
text encoder are the base's own objects, so the LoRAs loaded into that UNet apply unchanged.

Only the generation worker thread calls ControlNets (it owns the device); nothing here touches HTTP.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import ControlNetModel, DiffusionPipeline

from models.engine.device import DeviceConfig
from models.errors import ControlNetNotFound, InvalidRequest, ModelUnavailable, PathNotAllowed
from models.registry import Registry, builtins
from models.settings import Settings
from models.sources import has_control_characters, is_hf_repo_id, is_inside_roots, looks_like_path
from models.tasks import task_spec
from models.types import ControlNetInfo

logger = logging.getLogger(__name__)

# The UNet settings a ControlNet's residuals depend on: any difference means its outputs do not fit the UNet.
_MATCHING_CONFIG = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block",
                    "cross_attention_dim")


@dataclass
class _LoadedControlNet:
    name: str
    source: str
    model: ControlNetModel
    preloaded: bool = False
    loaded_at: float = field(default_factory=time.time)
    uses: int = 0

    def info(self) -> ControlNetInfo:
        return ControlNetInfo(self.name, self.source, self.preloaded, self.loaded_at, self.uses)


class ControlNets:
    """The loaded ControlNets, by name, least recently used first. One set for all bases: a ControlNet does not
    depend on the base it runs with, as long as the architectures fit (checked per request)."""

    def __init__(self, settings: Settings, registry: Registry, device: DeviceConfig):
        self.settings = settings
        self.registry = registry
        self.device = device
        self._loaded: OrderedDict[str, _LoadedControlNet] = OrderedDict()
        # (base, task, ControlNet) -> the pipeline derived for them; dropped with the base or the ControlNet.
        self._pipelines: dict[tuple[str, str, tuple[str, ...]], DiffusionPipeline] = {}
        # base -> the ControlNets its last request ran with (none: a plain pipeline), for /pipeline-state.
        self.applied: dict[str, tuple[str, ...]] = {}

    # -- per request -------------------------------------------------------------------------------------------
    def pipeline_for(
        self, base: DiffusionPipeline, model_name: str, task: str, names: tuple[str, ...]
    ) -> DiffusionPipeline:
        """The ControlNet pipeline for `task` on a loaded base pipeline, built on the base's own components; with
        several names, one pipeline running them all (diffusers' MultiControlNetModel over the loaded ones)."""
        loaded = [self._get(name) for name in names]
        for item in loaded:
            check_fits(item.model, base.unet, item.name, model_name)
        # Kept only once they fit: a refused ControlNet leaves the loaded set (and its memory) as it was.
        for item in loaded:
            self._remember(item)
        key = (model_name, task, names)
        pipeline = self._pipelines.get(key)
        if pipeline is None or pipeline.unet is not base.unet or not _runs(pipeline, [item.model for item in loaded]):
            models = [item.model for item in loaded]
            pipeline = self._derive(base, model_name, task, ", ".join(names), models[0] if len(models) == 1 else models)
            self._pipelines[key] = pipeline
        for item in loaded:
            item.uses += 1
        return pipeline

    def forget_model(self, model_name: str) -> None:
        """Drop the pipelines derived from a base that is being unloaded, so they do not keep it in memory."""
        self.applied.pop(model_name, None)
        for key in [key for key in self._pipelines if key[0] == model_name]:
            del self._pipelines[key]

    def _derive(
        self, base: DiffusionPipeline, model_name: str, task: str, name: str,
        controlnet: ControlNetModel | list[ControlNetModel],
    ) -> DiffusionPipeline:
        try:
            # AutoPipeline's from_pipe picks the family's ControlNet pipeline for the task and shares the base's
            # components as they are (no copy, no dtype cast of the UNet the base's other pipelines use).
            pipeline = task_spec(task).pipeline_class.from_pipe(base, controlnet=controlnet)
        except (ValueError, TypeError) as error:
            raise InvalidRequest(f"model {model_name!r} cannot run ControlNet {name!r}: {error}") from error
        pipeline.set_progress_bar_config(disable=True)
        logger.info("derived %s for model %r with ControlNet %r", type(pipeline).__name__, model_name, name)
        return pipeline

    # -- preloading (seed 003's routes), between jobs -----------------------------------------------------------
    def preload(
        self, source: str, name: str | None = None, check_against: tuple[str, DiffusionPipeline] | None = None
    ) -> ControlNetInfo:
        """Load a ControlNet named by a registry name, a folder inside the allowed roots or a cached repo id, under
        `name` (default: the source). With `check_against` (a base's name and pipeline), one that does not fit
        that base is refused."""
        key = name or source
        controlnet = self._load_model(source)
        if check_against is not None:
            model_name, base = check_against
            check_fits(controlnet, base.unet, key, model_name)
        if self._loaded.pop(key, None) is not None:  # one name, one ControlNet: loading a name again replaces it
            self._forget_controlnet(key)
        loaded = _LoadedControlNet(key, source, controlnet, preloaded=True)
        self._remember(loaded)
        return loaded.info()

    def unload(self, name: str) -> bool:
        loaded = self._loaded.pop(name, None)
        if loaded is None:
            return False
        self._forget_controlnet(name)
        logger.info("ControlNet %r unloaded", name)
        return True

    def loaded(self) -> list[ControlNetInfo]:
        return [loaded.info() for loaded in self._loaded.values()]

    def latest_preloaded(self) -> str | None:
        """The ControlNet loaded most recently through /load-controlnet/ (seed 003 generates with that one)."""
        preloaded = [loaded for loaded in self._loaded.values() if loaded.preloaded]
        return max(preloaded, key=lambda loaded: loaded.loaded_at).name if preloaded else None

    # -- internals ---------------------------------------------------------------------------------------------
    def _get(self, name: str) -> _LoadedControlNet:
        loaded = self._loaded.get(name)
        entry = self.registry.entries().get(name)
        if loaded is not None and (loaded.preloaded or entry is None or entry.source == loaded.source):
            return loaded
        if entry is None or entry.kind != "controlnet":
            what = f"{name!r} is a {entry.kind} model, not a ControlNet" if entry else f"unknown ControlNet {name!r}"
            raise ControlNetNotFound(f"{what}; {self.known()}")
        return _LoadedControlNet(name, entry.source, self._load_model(entry.source, registry_name=name))

    def known(self) -> str:
        registered = ", ".join(self.registry.names(kinds=("controlnet",))) or "none"
        preloaded = ", ".join(name for name, loaded in self._loaded.items() if loaded.preloaded) or "none"
        return f"registered ControlNets: {registered}; loaded with /load-controlnet/: {preloaded}"

    def _remember(self, loaded: _LoadedControlNet) -> None:
        """Keep `loaded` as the most recently used, unloading the least recently used past the bound."""
        self._loaded[loaded.name] = loaded
        self._loaded.move_to_end(loaded.name)
        while len(self._loaded) > self.settings.max_controlnets:
            oldest = next(iter(self._loaded))
            logger.info("unloading ControlNet %r (least recently used)", oldest)
            self._loaded.pop(oldest)
            self._forget_controlnet(oldest)

    def _forget_controlnet(self, name: str) -> None:
        for key in [key for key in self._pipelines if name in key[2]]:
            del self._pipelines[key]

    def _load_model(self, source: str, registry_name: str | None = None) -> ControlNetModel:
        """ControlNetModel.from_pretrained on the server's device and dtype. A client-named source is a registry
        name, a folder inside the allowed roots or a repo in the local HF cache; a registry entry's source is
        trusted like a base model's."""
        shown = registry_name or source
        if registry_name is None:
            entry = self.registry.entries().get(source)
            if entry is not None:
                if entry.kind != "controlnet":
                    raise InvalidRequest(f"{source!r} is a {entry.kind} model, not a ControlNet; {self.known()}")
                return self._load_model(entry.source, registry_name=source)
        location = self._locate(source, shown, trusted=registry_name is not None)
        started = time.perf_counter()
        try:
            controlnet = ControlNetModel.from_pretrained(
                location, torch_dtype=self.device.dtype, local_files_only=not self.settings.allow_downloads
            )
        except (OSError, ValueError) as error:
            logger.warning("ControlNet %r could not be loaded from %s: %s", shown, location, error)
            raise ModelUnavailable(
                f"ControlNet {shown!r} ({source}) could not be loaded: not a diffusers ControlNet folder "
                "(config.json + diffusion_pytorch_model.safetensors), or a repo not in the local Hugging Face "
                f"cache (download it once with `hf download {source}`)"
            ) from error
        controlnet.to(self.device.device)
        controlnet.eval()
        logger.info("ControlNet %r loaded from %s in %.2fs", shown, location, time.perf_counter() - started)
        return controlnet

    def _locate(self, source: str, shown: str, trusted: bool) -> str | Path:
        if has_control_characters(source):
            raise InvalidRequest(f"ControlNet {shown!r}: a name or path cannot hold control characters")
        if source.startswith("demo:"):
            builtin = source.removeprefix("demo:")
            if builtin not in builtins.CONTROLNET_BUILDERS:
                raise ModelUnavailable(
                    f"ControlNet {shown!r}: unknown builtin {source!r}; builtin ControlNets: "
                    + ", ".join(f"demo:{name}" for name in builtins.builtin_controlnet_names())
                )
            return builtins.ensure_builtin(builtin, self.settings.cache_dir)
        path = Path(source).expanduser()
        if looks_like_path(source):
            resolved = path.resolve()
            # Roots are checked before existence, so a refused path says nothing about what exists there.
            if not trusted and not is_inside_roots(self.settings, resolved):
                logger.warning("ControlNet %r refused: %s is outside the allowed roots", shown, resolved)
                raise PathNotAllowed(
                    f"ControlNet {shown!r} is outside the folders weights may be read from; put it under the "
                    "models or training output folder, or add its folder to SDSERVE_LORA_ROOTS"
                )
            if not (resolved / "config.json").is_file():
                raise ControlNetNotFound(f"ControlNet {shown!r}: no diffusers ControlNet folder (config.json) at "
                                         f"{source}")
            return resolved
        if not is_hf_repo_id(source):
            raise ControlNetNotFound(
                f"unknown ControlNet {shown!r}: not a registry name, a folder or a Hugging Face repo id; {self.known()}"
            )
        return source


def _runs(pipeline: DiffusionPipeline, models: list[ControlNetModel]) -> bool:
    """The pipeline runs exactly these loaded ControlNet objects (one, or a MultiControlNetModel of them)."""
    current = pipeline.controlnet
    nets = list(current.nets) if hasattr(current, "nets") else [current]
    return len(nets) == len(models) and all(a is b for a, b in zip(nets, models, strict=True))


def check_fits(controlnet: ControlNetModel, unet: Any, name: str, model_name: str) -> None:
    """A ControlNet adds residuals to the UNet's down and mid blocks: their channels and layout must match."""
    differences = []
    for key in _MATCHING_CONFIG:
        ours, theirs = _normalised(controlnet.config.get(key)), _normalised(unet.config.get(key))
        if ours != theirs:
            differences.append(f"{key} {ours} vs {theirs}")
    if differences:
        raise InvalidRequest(
            f"ControlNet {name!r} does not fit model {model_name!r}: it was made for another base architecture "
            f"(ControlNet vs UNet: {'; '.join(differences)})"
        )


def _normalised(value: Any) -> Any:
    return list(value) if isinstance(value, list | tuple) else value
