"""Names and sources: the one place that says what a valid name is, when a string is a path or a Hugging Face repo
id, which folders client-named files may come from, and which weight files can run code when loaded."""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants as hf_constants

from models.settings import Settings

# Registry entries, training runs and their registered outputs.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# Adapter names inside a pipeline (PEFT accepts fewer characters than registry names).
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,100}$"

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_valid_name(name: str) -> bool:
    return re.fullmatch(NAME_PATTERN, name) is not None


def is_hf_repo_id(source: str) -> bool:
    return _HF_REPO_ID.fullmatch(source) is not None


def looks_like_path(source: str) -> bool:
    """A local file or folder rather than a repo id: absolute, relative with ./ or ../, a weight file's name, or
    deeper than owner/name."""
    path = Path(source)
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or path.suffix.lower() in WEIGHT_SUFFIXES
        or ".." in path.parts
        or len(path.parts) > 2
    )


def is_pickle(path: Path | str) -> bool:
    return Path(path).suffix.lower() in PICKLE_SUFFIXES


def pickle_refusal(path: Path | str, settings: Settings, what: str) -> str | None:
    """Why a weight file may not be read, when it is a pickle (which can run code when loaded) and
    SDSERVE_ALLOW_PICKLE is off; None when it may be read. Callers raise the error their context calls for."""
    if not is_pickle(path) or settings.allow_pickle:
        return None
    return (
        f"{what}: {Path(path).name} is a pickle file, which can run code when loaded; convert it to "
        ".safetensors, or start the server with SDSERVE_ALLOW_PICKLE=true if you trust it"
    )


def hf_cache_dir() -> Path:
    # Read at call time so HF_HOME / HF_HUB_CACHE changes (and tests) are honoured.
    return Path(hf_constants.HF_HUB_CACHE)


def allowed_roots(settings: Settings) -> list[Path]:
    """Folders that client-named weight files (LoRAs, ControlNets, bases registered through the API) may be read
    from."""
    if settings.lora_roots is not None:
        roots = list(settings.lora_roots)
    else:
        # The server's own builtin models (cache_dir) too: a registered single-file checkpoint may take its
        # configs from one of them.
        roots = [settings.registry_path.parent, settings.output_dir, settings.cache_dir, hf_cache_dir()]
    return [root.expanduser().resolve() for root in roots]


def is_inside_roots(settings: Settings, resolved: Path) -> bool:
    """Whether a resolved path (symlinks and `..` gone) lies inside one of the allowed roots."""
    return any(resolved.is_relative_to(root) for root in allowed_roots(settings))


def has_control_characters(text: str) -> bool:
    """NUL and other control characters: no file name a client means has them, and the OS refuses NUL."""
    return any(ord(character) < 32 or ord(character) == 127 for character in text)


def source_refusal(settings: Settings, source: str, what: str) -> str | None:
    """Why a client may not register this source (a model's `source` or `config`); None when it may.

    `demo:` builtins and Hugging Face repo ids (read from the local cache) are fine. Anything that names a file or
    folder, or that exists on disk, must resolve (symlinks and `..` gone) inside the allowed roots. The answer is
    the same whether or not the path exists, so it tells nothing about the server's files."""
    if source.startswith("demo:"):
        return None
    refusal = (f"{what} must be a demo: builtin, a Hugging Face repo id, or a file or folder inside the folders "
               "weights may be read from (the registry's folder, the output folder, the builtin models' cache, the "
               "Hugging Face cache, or SDSERVE_LORA_ROOTS)")
    if has_control_characters(source):
        return refusal
    path = Path(source).expanduser()
    if not looks_like_path(source) and is_hf_repo_id(source) and not path.exists():
        return None
    return None if is_inside_roots(settings, path.resolve()) else refusal
