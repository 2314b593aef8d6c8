"""The model registry: `registry.yaml` (entries people edit by hand and training runs write), the code that reads
and writes it safely, and the builtin models a `demo:NAME` source builds offline.

    entries.py    RegistryEntry: what a name stands for (plain data, shared with the engine's clients)
    registry.py   Registry: validated reads, atomic commented writes, reload when the file changes
    builtins.py   demo:tiny, demo:sdxl-tiny, demo:sd3-tiny, demo:flux-tiny, demo:sd15, ... built from code
    components.py what the builtins are made of: tokenizers written in code, small encoders, the pass-through VAE
    detect.py     an entry's model family without loading it (model_index.json, a checkpoint's tensor names)
"""

from models.registry.entries import BASE_KINDS, FAMILY_NAMES, FamilyName, ModelKind, RegistryEntry
from models.registry.registry import Registry

__all__ = ["BASE_KINDS", "FAMILY_NAMES", "FamilyName", "ModelKind", "Registry", "RegistryEntry"]
