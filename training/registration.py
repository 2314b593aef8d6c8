"""Registering a trained LoRA: a `lora` entry written through the registry's own atomic, comment-keeping code
(a fully trained model registers as a `base`: `training.full_model`).

The check runs before training (a taken name or an unregistered base fails in seconds, not after hours); the
write runs after the weights are saved. A running server re-reads the file when it changes, so the model shows in
`GET /models` without a restart.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path

from models.errors import InvalidRequest, RegistryError
from models.registry import Registry, RegistryEntry
from training.base_model import BaseChoice
from training.config import RunOptions, TrainingOptions
from training.dataset_files import file_sha256

logger = logging.getLogger(__name__)


def check_registration(options: RunOptions, base: BaseChoice, registry: Registry) -> None:
    if options.register_as is None:
        return
    if base.name is None and isinstance(options, TrainingOptions):  # a LoRA names the base it needs
        raise InvalidRequest(
            f"--register needs --base to be a registered model name, not a path ({base.requested}); "
            "register the base first (POST /models or the registry file, SDSERVE_REGISTRY_PATH)"
        )
    if options.register_as == base.name:
        raise InvalidRequest(f"--register {options.register_as!r} is the base's own name; choose another")
    existing = registry.entries().get(options.register_as)
    if existing is not None and not options.register_replace:
        raise RegistryError(
            f"model {options.register_as!r} is already registered ({existing.kind}, {existing.source}); "
            "choose another name or pass --register-replace"
        )


def register_weights(
    options: TrainingOptions, base: BaseChoice, registry: Registry, weights: Path, run_id: str,
    trigger_words: list[str],
) -> RegistryEntry:
    assert options.register_as is not None and base.name is not None  # checked by check_registration
    entry = RegistryEntry(
        kind="lora",
        source=str(weights.resolve()),
        base=base.name,
        scale=options.register_scale,
        trigger_words=trigger_words,
        sha256=file_sha256(weights),
        created_by=run_id,
        created_at=datetime.now(timezone.utc).replace(microsecond=0),
        description=options.description or f"{options.kind} LoRA trained by run {run_id} on {base.name}",
    )
    registry.register(options.register_as, entry, replace=options.register_replace)
    logger.info("registered %r (%s) in %s", options.register_as, weights, registry.path)
    return entry
