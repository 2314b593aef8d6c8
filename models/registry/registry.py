"""The model registry: a YAML file people edit by hand and programs write through this module.

Reads validate every entry (a typo stops the start with the line that is wrong). Writes take a file lock,
re-read the file, change one entry and replace the file atomically, keeping comments and order.
The file is re-read when it changes on disk, so an edit or a training run shows up without a restart.

A file that does not exist yet is created from the packaged one. A file that exists but is empty, invalid or
later goes missing is never taken for "no models": the start fails naming it, a running server keeps its last
good entries, and writes are refused (RegistryUnavailable) without touching the file.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from filelock import FileLock
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from models.errors import ModelNotFound, RegistryError, RegistryUnavailable
from models.registry.entries import RegistryEntry
from models.sources import is_valid_name

logger = logging.getLogger(__name__)

PACKAGED_REGISTRY = Path(__file__).resolve().parent / "registry.yaml"


class Registry:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._entries: dict[str, RegistryEntry] = {}
        self._stamp: tuple[int, int] | None = None
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # A new registry starts as a copy of the packaged one: the demo entry and commented examples.
            self._replace_file(PACKAGED_REGISTRY.read_text(encoding="utf-8"))
        self.reload()

    # -- reading -------------------------------------------------------------------------------------------
    def reload(self) -> dict[str, RegistryEntry]:
        """Re-read the file; raises RegistryUnavailable naming the line of the first invalid entry."""
        with self._lock:
            stamp = self._file_stamp()
            text = self._read()
            self._entries = _parse(text, self.path)
            self._stamp = stamp
            return dict(self._entries)

    def entries(self) -> dict[str, RegistryEntry]:
        self._reload_if_changed()
        return dict(self._entries)

    def names(self, kinds: tuple[str, ...] | None = None) -> list[str]:
        return sorted(name for name, entry in self.entries().items() if kinds is None or entry.kind in kinds)

    def get(self, name: str, kinds: tuple[str, ...] | None = None) -> RegistryEntry:
        entry = self.entries().get(name)
        if entry is None or (kinds is not None and entry.kind not in kinds):
            raise ModelNotFound(name, self.names(kinds))
        return entry

    # -- writing -------------------------------------------------------------------------------------------
    def register(self, name: str, entry: RegistryEntry, replace: bool = False) -> RegistryEntry:
        def change(models: CommentedMap) -> None:
            if name in models and not replace:
                raise RegistryError(f"model {name!r} is already registered; pass replace to overwrite it")
            models[name] = entry.model_dump(mode="json", exclude_none=True, exclude_defaults=True) | {
                "kind": entry.kind,
                "source": entry.source,
            }

        self._edit(change)
        return entry

    def delete(self, name: str) -> None:
        def change(models: CommentedMap) -> None:
            if name not in models:
                raise ModelNotFound(name, sorted(models))
            del models[name]

        self._edit(change)

    def _edit(self, change: Any) -> None:
        with FileLock(str(self.path) + ".lock"), self._lock:
            current = self._read()
            _parse(current, self.path)  # a broken file is reported, and left as it is for a person to fix
            yaml = _yaml()
            document = yaml.load(current)
            models = document.setdefault("models", CommentedMap())
            if models is None:  # `models:` with nothing under it
                models = document["models"] = CommentedMap()
            change(models)
            buffer = io.StringIO()
            yaml.dump(document, buffer)
            text = buffer.getvalue()
            self._entries = _parse(text, self.path)
            self._replace_file(text)
            self._stamp = self._file_stamp()

    def _replace_file(self, text: str) -> None:
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                stream.write(text)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError as error:
            raise RegistryUnavailable(f"{self.path}: the registry file is missing; restore it (or restart the "
                                      "server to start again from the packaged registry)") from error
        except (OSError, UnicodeDecodeError) as error:
            raise RegistryUnavailable(f"{self.path}: the registry file cannot be read: {error}") from error

    def _file_stamp(self) -> tuple[int, int]:
        try:
            stat = self.path.stat()
        except FileNotFoundError as error:
            raise RegistryUnavailable(f"{self.path}: the registry file is missing") from error
        return stat.st_mtime_ns, stat.st_size

    def _reload_if_changed(self) -> None:
        try:
            changed = self._file_stamp() != self._stamp
        except RegistryUnavailable:
            return  # gone for a moment (an editor saving it) or for good: the last good entries stay
        if not changed:
            return
        try:
            self.reload()
            logger.info("registry %s changed on disk; reloaded %d entries", self.path, len(self._entries))
        except RegistryError as error:
            # A half-saved edit must not take the server down: keep serving the last good entries.
            logger.error("registry %s changed but is invalid, keeping the previous entries: %s", self.path, error)
            self._stamp = self._file_stamp()


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _parse(text: str, path: Path) -> dict[str, RegistryEntry]:
    """Every entry of a registry file's text; RegistryUnavailable (naming the line) when the file is broken."""
    try:
        document = _yaml().load(text)
    except YAMLError as error:
        raise RegistryUnavailable(f"{path}: not valid YAML: {error}") from error
    if document is None:
        # An empty file is a damaged one (a full disk, a truncating editor), never a wish to drop every model.
        raise RegistryUnavailable(f"{path}: the registry file is empty; restore it, write `models: {{}}` for an "
                                  "empty registry, or delete it to start again from the packaged registry")
    if not isinstance(document, dict) or not isinstance(document.get("models") or {}, dict):
        raise RegistryUnavailable(f"{path}: expected a mapping with a 'models:' mapping of name -> entry")
    models = document.get("models") or {}
    entries: dict[str, RegistryEntry] = {}
    for name, raw in models.items():
        line = _line_of(models, name)
        if not isinstance(name, str) or not is_valid_name(name):
            raise RegistryUnavailable(f"{path} line {line}: invalid model name {name!r} (letters, digits, . _ -)")
        try:
            entries[name] = RegistryEntry.model_validate(raw if raw is not None else {})
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in error.errors())
            raise RegistryUnavailable(f"{path} line {line}: entry {name!r}: {problems}") from error
    return entries


def _line_of(mapping: Any, key: Any) -> int | str:
    try:
        return mapping.lc.key(key)[0] + 1
    except (AttributeError, KeyError, TypeError):
        return "?"
