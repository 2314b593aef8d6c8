"""The result cache: a repeated deterministic request (an explicit seed) is answered without the device."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

from models.jobs.records import request_parameters
from models.registry import RegistryEntry
from models.types import GenerationRequest, GenerationResult


class ResultCache:
    """A bounded LRU of finished results, keyed by everything that determines the pixels."""

    def __init__(self, size: int):
        self.size = size
        self._results: OrderedDict[str, GenerationResult] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def get(self, key: str) -> GenerationResult | None:
        with self._lock:
            result = self._results.get(key)
            if result is None:
                self.misses += 1
                return None
            self._results.move_to_end(key)
            self.hits += 1
            return result

    def put(self, key: str, result: GenerationResult) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._results[key] = result
            self._results.move_to_end(key)
            while len(self._results) > self.size:
                self._results.popitem(last=False)

    def __len__(self) -> int:
        return len(self._results)


def cache_key(request: GenerationRequest, model: str, entries: dict[str, RegistryEntry]) -> str | None:
    """What determines the pixels of a request with its seed chosen: every field, and the registry entries it
    names (a re-registered model makes other pixels). None when something it names can change behind its name."""
    if any(lora.name not in entries for lora in request.loras):
        return None  # a LoRA by path or preloaded name can change on disk behind the same name
    controlnets = [control.name for control in request.controlnets]
    if any(name not in entries for name in controlnets):
        return None  # a ControlNet loaded with /load-controlnet/ can be replaced under the same name
    refiner = [request.refiner] if request.refiner else []
    names = [model, *(lora.name for lora in request.loras), *controlnets, *refiner]
    identity = {
        "parameters": request_parameters(request),
        "model": model,
        "entries": {name: entries[name].model_dump(mode="json") for name in names if name in entries},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
