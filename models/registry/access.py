"""The registry as engines offer it to clients: listings with each entry's family filled in, and the checks every
change through the API passes (a source path inside the allowed roots, the default model kept). One place for them,
so the in-process engine and the Ray Serve ingress answer alike; evicting what a change makes stale is the engine's.
"""

from __future__ import annotations

import logging

from models.errors import ModelInUse, PathNotAllowed
from models.registry.detect import FamilyDetector
from models.registry.entries import RegistryEntry
from models.registry.registry import Registry
from models.settings import Settings
from models.sources import source_refusal

logger = logging.getLogger(__name__)


class RegistryAccess:
    """Blocking (file reads, family detection): call it from a thread, not the event loop."""

    def __init__(self, registry: Registry, settings: Settings):
        self.registry = registry
        self.settings = settings
        self.families = FamilyDetector()

    def entries(self) -> dict[str, RegistryEntry]:
        return self._with_families(self.registry.entries())

    def reload(self) -> dict[str, RegistryEntry]:
        return self._with_families(self.registry.reload())

    def register(self, name: str, entry: RegistryEntry, replace: bool = False) -> RegistryEntry:
        # A client names the source: a path must lie inside the allowed roots, as a LoRA's must.
        for field_name in ("source", "config"):
            value = getattr(entry, field_name)
            refusal = source_refusal(self.settings, value, f"model {name!r}: {field_name}") if value else None
            if refusal:
                logger.warning("refused to register %r with %s %r: outside the allowed roots", name, field_name,
                               value)
                raise PathNotAllowed(refusal)
        registered = self.registry.register(name, entry, replace)
        return self._with_families({name: registered})[name]

    def unregister(self, name: str) -> None:
        if name == self.settings.default_model:
            raise ModelInUse(f"model {name!r} is the default model (SDSERVE_DEFAULT_MODEL): every request without "
                             "`model` uses it; start the server with another default before removing it")
        self.registry.delete(name)

    def _with_families(self, entries: dict[str, RegistryEntry]) -> dict[str, RegistryEntry]:
        """The entries with `family` filled in where the registry file leaves it to detection."""
        everything = self.registry.entries()
        detect = self.families.family
        return {name: entry if entry.family else entry.model_copy(update={"family": detect(entry, everything)})
                for name, entry in entries.items()}
