"""Which family a registry entry is, without loading it: the entry's own `family`, else its files.

A builtin knows its family; a diffusers folder (or a repo in the local Hugging Face cache) says it in
model_index.json; a single .safetensors checkpoint by its tensor names, read from the file's header only. Pickle
checkpoints are never opened here (reading them can run code). A LoRA has the family of its base; a ControlNet
the one its config.json describes. Answers are cached per source and file stamp, so listing the registry stays
cheap.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from models.families import family_of_checkpoint_keys, family_of_model_index_text
from models.registry.builtins import BUILDERS, CONTROLNET_FAMILIES
from models.registry.entries import BASE_KINDS, FamilyName, RegistryEntry
from models.sources import is_hf_repo_id

logger = logging.getLogger(__name__)

_MAX_HEADER_BYTES = 64 * 2**20  # a safetensors header is the tensor index: megabytes at most


class FamilyDetector:
    """Families of registry entries, cached by (source, file stamp). Safe to call from any thread."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, bool, tuple[int, int] | None], FamilyName | None] = {}
        self._lock = threading.Lock()

    def family(self, entry: RegistryEntry, entries: dict[str, RegistryEntry] | None = None) -> FamilyName | None:
        """The entry's family: given, or detected; an adapter's is its base's. None when it cannot be told."""
        if entry.family is not None:
            return entry.family
        if entry.kind == "controlnet":
            return self.of_source(entry.source, controlnet=True)
        if entry.kind not in BASE_KINDS:
            base = (entries or {}).get(entry.base or "")
            return self.family(base) if base is not None and base.kind in BASE_KINDS else None
        return self.of_source(entry.source)

    def of_source(self, source: str, controlnet: bool = False) -> FamilyName | None:
        key = (source, controlnet, _stamp(source))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        family = _detect_controlnet(source) if controlnet else _detect(source)
        with self._lock:
            self._cache[key] = family
        return family


def _detect(source: str) -> FamilyName | None:
    if source.startswith("demo:"):
        builtin = BUILDERS.get(source.removeprefix("demo:"))
        return builtin.family if builtin else None
    path = Path(source).expanduser()
    try:
        if path.is_dir():
            index = path / "model_index.json"
            return family_of_model_index_text(index.read_text(encoding="utf-8")) if index.is_file() else None
        if path.is_file():
            return family_of_checkpoint_keys(safetensors_keys(path)) if path.suffix == ".safetensors" else None
    except OSError as error:
        logger.warning("could not read %s to tell its model family: %s", source, error)
        return None
    if is_hf_repo_id(source):
        cached = try_to_load_from_cache(source, "model_index.json")
        if isinstance(cached, str):
            return family_of_model_index_text(Path(cached).read_text(encoding="utf-8"))
    return None


def _detect_controlnet(source: str) -> FamilyName | None:
    """A diffusers ControlNet's family from its config.json: SDXL ones carry SDXL's size conditioning."""
    if source.startswith("demo:"):
        return CONTROLNET_FAMILIES.get(source.removeprefix("demo:"))
    config_file: Path | None = Path(source).expanduser() / "config.json"
    if not config_file.is_file() and is_hf_repo_id(source):
        cached = try_to_load_from_cache(source, "config.json")
        config_file = Path(cached) if isinstance(cached, str) else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    classes: dict[str, FamilyName] = {"SD3ControlNetModel": "sd3", "FluxControlNetModel": "flux"}
    if config.get("_class_name") in classes:
        return classes[config["_class_name"]]
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def safetensors_keys(path: Path) -> set[str]:
    """The tensor names of a .safetensors file, from its JSON header (8-byte length, then the header)."""
    with path.open("rb") as stream:
        prefix = stream.read(8)
        if len(prefix) != 8:
            raise OSError(f"{path.name}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER_BYTES:
            raise OSError(f"{path.name}: header of {length} bytes; not a safetensors file")
        try:
            header = json.loads(stream.read(length))
        except ValueError as error:
            raise OSError(f"{path.name}: not a safetensors file ({error})") from error
    return {key for key in header if key != "__metadata__"}


def _stamp(source: str) -> tuple[int, int] | None:
    path = Path(source).expanduser()
    for candidate in (path / "model_index.json", path):
        try:
            if candidate.is_file():
                stat = candidate.stat()
                return stat.st_mtime_ns, stat.st_size
        except OSError:
            return None
    return None
