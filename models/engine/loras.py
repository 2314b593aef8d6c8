"""LoRA adapters at serving time.

1. Resolve: a request names a LoRA (a registry entry of kind `lora`, a local file or folder, or a Hugging Face repo
   id already in the local HF cache) and gets one weight file, checked to lie inside the allowed folders.
2. Load once: each base model keeps its adapters loaded in its pipeline (diffusers + PEFT), keyed by file, the least
   recently used unloaded past SDSERVE_MAX_LORAS. A load that fails is rolled back: the pipeline stays as it was.
3. Activate per request: exactly the request's adapters with their scales (`set_adapters`); a request without LoRAs
   disables them, so the plain base runs.

Only the generation worker thread calls LoraAdapters (it owns the pipelines); LoraResolver only reads files.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
from diffusers import DiffusionPipeline
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import SafetensorError

from models import metrics
from models.errors import AdapterNotFound, InvalidRequest, PathNotAllowed
from models.registry import Registry, RegistryEntry
from models.registry.detect import safetensors_keys
from models.settings import Settings
from models.sources import (
    PICKLE_SUFFIXES,
    WEIGHT_SUFFIXES,
    allowed_roots,
    has_control_characters,
    hf_cache_dir,
    is_hf_repo_id,
    is_inside_roots,
    looks_like_path,
    pickle_refusal,
)
from models.types import ActiveLora, LoraInfo, LoraSpec

logger = logging.getLogger(__name__)

# The names diffusers' training scripts save, in the order they are preferred.
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
# Training checkpoints: checkpoint-500/, step_500, step500, name-000500.safetensors (the number ends the name).
_STEP = re.compile(r"(?:^|[-_.]|step|steps|checkpoint|ckpt|epoch)(\d+)$", re.IGNORECASE)
_ADAPTER_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ResolvedLora:
    reference: str
    file: Path  # as found (a symlink in the HF cache keeps its name and suffix); its target is inside the roots
    target: Path  # the file itself, symlinks resolved: identifies the adapter
    default_scale: float = 1.0
    trigger_words: tuple[str, ...] = ()
    registry_name: str | None = None
    sha256: str | None = None  # the registry entry's, when it has one


def with_trigger_words(prompt: str, loras: tuple[ActiveLora, ...]) -> str:
    """The prompt with each used LoRA's trigger words appended, unless the prompt already has them."""
    words: list[str] = []
    for lora in loras:
        if lora.scale == 0:
            continue  # a LoRA at scale 0 gives the base image, so it must not change the prompt either
        words += [word for word in lora.trigger_words if word.lower() not in prompt.lower() and word not in words]
    return ", ".join([prompt, *words]) if words else prompt


class LoraResolver:
    """From a reference to one weight file inside the allowed folders, or a clear 4xx."""

    def __init__(self, settings: Settings, registry: Registry):
        self.settings = settings
        self.registry = registry

    def resolve(self, spec: LoraSpec) -> ResolvedLora:
        shown = spec.name
        if has_control_characters(spec.name + (spec.weight_name or "")):
            raise InvalidRequest(f"LoRA {shown!r}: a name, path or weight_name cannot hold control characters")
        entry = self._registry_entry(spec.name)
        source = entry.source if entry else spec.name
        weight_name = spec.weight_name or (entry.weight_name if entry else None)
        location = self._locate(source, shown)
        file = self._weight_file(location, weight_name, shown)
        target = self._inside_roots(file, shown)  # a symlink inside an allowed folder may point out of it
        self._check_format(file, shown)
        return ResolvedLora(
            reference=spec.name,
            file=file,
            target=target,
            default_scale=entry.scale if entry else 1.0,
            trigger_words=tuple(entry.trigger_words) if entry else (),
            registry_name=spec.name if entry else None,
            sha256=entry.sha256 if entry else None,
        )

    # 1. the registry, a path or a repo id
    def _registry_entry(self, name: str) -> RegistryEntry | None:
        entry = self.registry.entries().get(name)
        if entry is not None and entry.kind != "lora":
            raise InvalidRequest(
                f"{name!r} is a {entry.kind} model, not a LoRA; registered LoRAs: {self._registered_loras()}"
            )
        return entry

    def _locate(self, source: str, shown: str) -> Path:
        path = Path(source).expanduser()
        if looks_like_path(source):
            return self._existing(path, source, shown)
        if not is_hf_repo_id(source):
            raise AdapterNotFound(
                f"unknown LoRA {shown!r}: not a registered LoRA ({self._registered_loras()}), "
                "a path to a file or folder, or a Hugging Face repo id"
            )
        local = path.resolve()
        if local.exists() and self._is_allowed(local):
            return path.absolute()
        return self._hf_snapshot(source, shown)

    def _existing(self, path: Path, source: str, shown: str) -> Path:
        # The roots are checked before existence, so a refused path says nothing about what exists there.
        resolved = self._inside_roots(path, shown)
        if not resolved.exists():
            raise AdapterNotFound(f"LoRA {shown!r}: no file or folder at {source}")
        # Keep the name as given (not normalised, which could differ from what was checked): a symlink in the HF
        # cache points at a blob without a suffix, and the suffix decides how the file is read.
        return path.absolute()

    def _hf_snapshot(self, repo_id: str, shown: str) -> Path:
        cache = hf_cache_dir()
        try:
            folder = huggingface_hub.snapshot_download(repo_id, cache_dir=cache, local_files_only=True)
        except (LocalEntryNotFoundError, ValueError, OSError) as error:
            logger.info("LoRA %r is not in the HF cache %s: %s", repo_id, cache, error)
            raise AdapterNotFound(
                f"LoRA {shown!r} is not a registered LoRA, a local path, or a repo in the local Hugging Face cache; "
                f"download it once with `hf download {repo_id}` (into HF_HOME) or register a local copy"
            ) from error
        self._inside_roots(Path(folder), shown)
        return Path(folder)

    # 2. a folder to one file
    def _weight_file(self, location: Path, weight_name: str | None, shown: str) -> Path:
        if location.is_file():
            if weight_name and weight_name != location.name:
                raise InvalidRequest(f"LoRA {shown!r} is a file; weight_name {weight_name!r} applies to folders")
            return location
        if weight_name:
            candidate = location / weight_name
            self._inside_roots(candidate, f"{shown} with weight_name {weight_name}")
            if not candidate.is_file():
                raise AdapterNotFound(f"LoRA {shown!r}: no file {weight_name!r} in its folder")
            return candidate
        file = _default_weight_file(location) or self._latest_checkpoint(location, shown)
        file = file or _lone_weight_file(location, shown)
        if file is None:
            raise AdapterNotFound(
                f"LoRA {shown!r}: no LoRA weights in its folder (looked for {LORA_WEIGHT_NAMES[0]}, "
                "training checkpoints and .safetensors files)"
            )
        return file

    def _latest_checkpoint(self, folder: Path, shown: str) -> Path | None:
        """The weight file of the highest-step checkpoint: a numbered subfolder or a numbered file.

        A kohya run saves `name-000500.safetensors` checkpoints and the finished `name.safetensors`: the finished
        file counts as the last step.
        """
        numbered: list[tuple[float, bool, Path]] = []
        prefixes: set[str] = set()
        for entry in folder.iterdir():
            stem = entry.name if entry.is_dir() else entry.stem
            match = _STEP.search(stem)
            weights = _checkpoint_weights(entry) if entry.is_dir() else _weight_file_or_none(entry)
            if match is None or weights is None:
                continue
            numbered.append((int(match[1]), weights.suffix == ".safetensors", weights))
            prefixes.add(stem[: match.start()])
        if not numbered:
            return None
        for entry in folder.iterdir():
            if _weight_file_or_none(entry) and entry.stem in prefixes:
                numbered.append((float("inf"), entry.suffix == ".safetensors", entry))
        step, _, chosen = max(numbered, key=lambda item: (item[0], item[1], item[2].name))
        logger.info("LoRA %r: folder %s resolves to %s (step %s)", shown, folder, chosen, step)
        return chosen

    # 3. safety
    def _check_format(self, file: Path, shown: str) -> None:
        refusal = pickle_refusal(file, self.settings, f"LoRA {shown!r}")
        if refusal:
            raise InvalidRequest(refusal)
        if file.suffix.lower() not in WEIGHT_SUFFIXES:
            raise InvalidRequest(f"LoRA {shown!r}: {file.name} is not a LoRA weight file (.safetensors)")

    def _inside_roots(self, path: Path, shown: str) -> Path:
        """The path with symlinks and `..` resolved, if that lies inside an allowed root; else a 403."""
        resolved = path.expanduser().resolve()
        if not self._is_allowed(resolved):
            logger.warning("LoRA %r refused: %s is outside the allowed roots %s", shown, resolved,
                           [str(root) for root in allowed_roots(self.settings)])
            raise PathNotAllowed(
                f"LoRA {shown!r} is outside the folders LoRAs may be read from; put it under the models or "
                "training output folder, or add its folder to SDSERVE_LORA_ROOTS"
            )
        return resolved

    def _is_allowed(self, resolved: Path) -> bool:
        return is_inside_roots(self.settings, resolved)

    def _registered_loras(self) -> str:
        return ", ".join(self.registry.names(kinds=("lora",))) or "none"


@dataclass
class _LoadedLora:
    adapter_name: str
    resolved: ResolvedLora
    stamp: tuple[int, int]
    scale: float
    trigger_words: tuple[str, ...]
    preloaded: bool = False
    loaded_at: float = field(default_factory=time.time)
    uses: int = 0

    def info(self) -> LoraInfo:
        return LoraInfo(self.adapter_name, self.resolved.reference, str(self.resolved.file), self.scale,
                        self.trigger_words, self.preloaded, self.loaded_at, self.uses)


class LoraAdapters:
    """The LoRAs loaded into one base pipeline (shared by its derived img2img/inpainting pipelines)."""

    def __init__(self, model_name: str, pipeline: DiffusionPipeline, resolver: LoraResolver, max_loaded: int):
        self.model_name = model_name
        self.pipeline = pipeline
        self.resolver = resolver
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[Path, _LoadedLora] = OrderedDict()  # by target file, least recently used first
        # What the pipeline runs now: () LoRA off, else (adapter, scale) pairs; None after a load or unload.
        self._applied: tuple[tuple[str, float], ...] | None = ()

    # -- called for every generation -------------------------------------------------------------------------
    def activate(self, specs: tuple[LoraSpec, ...]) -> tuple[ActiveLora, ...]:
        """Load what is missing, then make exactly these adapters, at these scales, the active ones."""
        if len(specs) > self.max_loaded:
            raise InvalidRequest(
                f"{len(specs)} LoRAs in one request, but only {self.max_loaded} are kept loaded per model "
                "(SDSERVE_MAX_LORAS)"
            )
        active: list[ActiveLora] = []
        keep: set[Path] = set()
        for spec in specs:
            lora, scale, trigger_words = self._ensure(spec, keep)
            if lora.resolved.target in keep:
                raise InvalidRequest(f"LoRA {spec.name!r} is listed twice; give it one scale")
            keep.add(lora.resolved.target)
            lora.uses += 1
            chosen = spec.scale if spec.scale is not None else scale
            active.append(ActiveLora(spec.name, lora.adapter_name, chosen, trigger_words,
                                     weight_name=spec.weight_name, sha256=lora.resolved.sha256))
        self._apply(active)
        return tuple(active)

    # -- called by the /loras routes through worker.call ------------------------------------------------------
    def preload(self, spec: LoraSpec, adapter_name: str | None, scale: float | None) -> LoraInfo:
        """Load a LoRA ahead of requests. Its adapter name then works as a LoRA name on this base, with `scale`."""
        if adapter_name is not None:
            _check_adapter_name(adapter_name)
        resolved = self.resolver.resolve(spec)
        existing = self._loaded.get(resolved.target)
        name = adapter_name or (existing.adapter_name if existing else None)
        # One name, one file: loading a name again replaces what it held (as seed 003's /load-lora/ did), and a
        # file loaded under another name, or changed on disk since, is loaded again.
        named = self._by_adapter_name(name)
        for lora in [existing] if named is existing else [named, existing]:
            if lora is not None and (
                lora.resolved.target != resolved.target or lora.adapter_name != name
                or lora.stamp != _stamp(resolved.target)
            ):
                self._unload(lora)
        lora = self._loaded.get(resolved.target) or self._load(resolved, set(), name)
        lora.preloaded = True
        lora.scale = scale if scale is not None else resolved.default_scale
        self._loaded.move_to_end(resolved.target)
        return lora.info()

    def unload(self, name: str) -> list[str]:
        """Unload adapters by adapter name or by the reference they were loaded with; returns the names unloaded."""
        matches = [lora for lora in self._loaded.values() if name in (lora.adapter_name, lora.resolved.reference)]
        for lora in matches:
            self._unload(lora)
        return [lora.adapter_name for lora in matches]

    def unload_all(self) -> None:
        for lora in list(self._loaded.values()):
            self._unload(lora)

    def loaded(self) -> list[LoraInfo]:
        return [lora.info() for lora in self._loaded.values()]

    def applied(self) -> list[tuple[str, float]]:
        return list(self._applied or ())

    def adapters_in_pipeline(self) -> set[str]:
        return {name for names in self.pipeline.get_list_adapters().values() for name in names}

    # -- internals ---------------------------------------------------------------------------------------------
    def _ensure(self, spec: LoraSpec, keep: set[Path]) -> tuple[_LoadedLora, float, tuple[str, ...]]:
        named = self._by_adapter_name(spec.name)
        if named is not None and named.preloaded:
            resolved, scale, trigger_words = named.resolved, named.scale, named.trigger_words
        else:
            resolved = self.resolver.resolve(spec)
            scale, trigger_words = resolved.default_scale, resolved.trigger_words
        lora = self._loaded.get(resolved.target)
        if lora is not None and lora.stamp != _stamp(resolved.target):
            logger.info("LoRA %r changed on disk; loading it again", spec.name)
            preloaded, adapter_name = lora.preloaded, lora.adapter_name
            self._unload(lora)
            lora = self._load(resolved, keep, adapter_name if preloaded else None)
            lora.preloaded, lora.scale = preloaded, scale
        elif lora is None:
            lora = self._load(resolved, keep, None)
        self._loaded.move_to_end(resolved.target)
        return lora, scale, trigger_words

    def _by_adapter_name(self, name: str | None) -> _LoadedLora | None:
        return next((lora for lora in self._loaded.values() if lora.adapter_name == name), None)

    def _load(self, resolved: ResolvedLora, keep: set[Path], adapter_name: str | None) -> _LoadedLora:
        if not hasattr(self.pipeline, "load_lora_weights"):
            raise InvalidRequest(f"model {self.model_name!r} ({type(self.pipeline).__name__}) does not take LoRAs")
        name = adapter_name or self._new_adapter_name(resolved)
        file = resolved.file
        stamp = _stamp(resolved.target)
        started = time.perf_counter()
        self._applied = None
        try:
            self.pipeline.load_lora_weights(
                str(file.parent), weight_name=file.name, adapter_name=name,
                use_safetensors=file.suffix == ".safetensors", local_files_only=True,
            )
        except (OSError, SafetensorError) as error:
            self._delete_adapter(name)
            raise InvalidRequest(
                f"LoRA {resolved.reference!r}: {file.name} could not be read; it is damaged or not a "
                f"{file.suffix or 'weight'} file ({_gist(error)})"
            ) from error
        except Exception as error:  # noqa: BLE001 - PEFT and diffusers raise several types for a mismatch
            logger.warning("LoRA %r did not load into %r: %s", resolved.reference, self.model_name, error)
            self._delete_adapter(name)
            raise InvalidRequest(
                f"LoRA {resolved.reference!r} does not fit model {self.model_name!r}: it was made for another base "
                f"architecture, or is not a LoRA ({_gist(error)})"
            ) from error
        if name not in self.adapters_in_pipeline():
            raise InvalidRequest(
                f"LoRA {resolved.reference!r} has no weights for the UNet or text encoder of model "
                f"{self.model_name!r}: it was made for another base architecture"
            )
        self._check_denoiser_took_it(name, resolved)
        lora = _LoadedLora(name, resolved, stamp, resolved.default_scale, resolved.trigger_words)
        self._loaded[resolved.target] = lora
        metrics.adapter_loaded(name)
        logger.info("LoRA %r loaded into %r as adapter %r from %s in %.2fs", resolved.reference, self.model_name,
                    name, file, time.perf_counter() - started)
        # Evict only after a successful load, so a failed one leaves every adapter where it was.
        while len(self._loaded) > self.max_loaded:
            oldest = next(old for target, old in self._loaded.items() if target not in keep | {resolved.target})
            logger.info("unloading LoRA %r from %r (least recently used)", oldest.adapter_name, self.model_name)
            self._unload(oldest)
        return lora

    def _check_denoiser_took_it(self, name: str, resolved: ResolvedLora) -> None:
        """A LoRA with UNet / transformer layers that only reached the text encoder was made for another family
        (an SDXL LoRA on FLUX: both have a CLIP-L text encoder): refuse it rather than half apply it."""
        denoiser = "unet" if hasattr(self.pipeline, "unet") else "transformer"
        if name in self.pipeline.get_list_adapters().get(denoiser, []) or resolved.file.suffix != ".safetensors":
            return
        keys = safetensors_keys(resolved.file)
        if any(not key.startswith(("text_encoder", "lora_te")) for key in keys):
            self._delete_adapter(name)
            raise InvalidRequest(
                f"LoRA {resolved.reference!r} does not fit model {self.model_name!r}: its {denoiser} layers were "
                "made for another base architecture (only text encoder layers matched)"
            )

    def _delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every component that has it; after a failed load that may be the UNet alone."""
        if adapter_name in self.adapters_in_pipeline():
            self.pipeline.delete_adapters([adapter_name])

    def _unload(self, lora: _LoadedLora) -> None:
        self._applied = None
        self._loaded.pop(lora.resolved.target, None)
        self._delete_adapter(lora.adapter_name)
        logger.info("LoRA adapter %r unloaded from %r", lora.adapter_name, self.model_name)

    def _apply(self, active: list[ActiveLora]) -> None:
        wanted = tuple((lora.adapter_name, lora.scale) for lora in active)
        if wanted == self._applied:
            return
        if not wanted:
            if self.adapters_in_pipeline():
                self.pipeline.disable_lora()
        else:
            self.pipeline.enable_lora()
            self.pipeline.set_adapters([name for name, _ in wanted], [scale for _, scale in wanted])
        self._applied = wanted
        metrics.adapters_switched()

    def _new_adapter_name(self, resolved: ResolvedLora) -> str:
        # Named after what the client wrote: the registry name, else the file or folder it named.
        given = Path(resolved.reference)
        label = resolved.registry_name or (given.parent.name if given.name in LORA_WEIGHT_NAMES else given.stem)
        base = _ADAPTER_NAME_CHARS.sub("_", label).strip("_")[:60] or "lora"
        taken = {lora.adapter_name for lora in self._loaded.values()} | self.adapters_in_pipeline()
        name, number = base, 2
        while name in taken:
            name, number = f"{base}_{number}", number + 1
        return name


def _default_weight_file(folder: Path) -> Path | None:
    return next((folder / name for name in LORA_WEIGHT_NAMES if (folder / name).is_file()), None)


def _weight_file_or_none(entry: Path) -> Path | None:
    return entry if entry.is_file() and entry.suffix.lower() in WEIGHT_SUFFIXES else None


def _checkpoint_weights(folder: Path) -> Path | None:
    """The LoRA in a checkpoint folder: the training scripts' file name, else its only .safetensors file.
    (A checkpoint folder also holds optimizer and RNG state, which are never LoRA weights.)"""
    found = _default_weight_file(folder)
    if found is None:
        safetensors_files = [entry for entry in folder.iterdir() if entry.is_file() and entry.suffix == ".safetensors"]
        found = safetensors_files[0] if len(safetensors_files) == 1 else None
    return found


def _lone_weight_file(folder: Path, shown: str) -> Path | None:
    """The only .safetensors file in the folder (else the only pickle file); several is ambiguous."""
    for suffixes in ((".safetensors",), PICKLE_SUFFIXES):
        files = sorted(entry for entry in folder.iterdir() if entry.is_file() and entry.suffix.lower() in suffixes)
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            names = ", ".join(file.name for file in files[:10])
            raise InvalidRequest(f"LoRA {shown!r}: its folder holds several weight files ({names}); "
                                 "choose one with weight_name")
    return None


def _check_adapter_name(name: str) -> None:
    if _ADAPTER_NAME_CHARS.search(name) or len(name) > 100:
        raise InvalidRequest(f"adapter_name {name!r}: use letters, digits, _ and - (at most 100)")


def _stamp(file: Path) -> tuple[int, int]:
    stat = file.stat()
    return stat.st_mtime_ns, stat.st_size


def _gist(error: BaseException) -> str:
    """The gist of a library error: its first two lines (a heading and the first mismatch), shortened."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or type(error).__name__
