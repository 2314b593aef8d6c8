"""What the OpenVINO fast path does the same way for every module it runs (the UNet, the VAE decoder).

1. Identify: `weights_digest` hashes a module's config and every weight with the versions that shape the export, so
   a fine-tune, a new checkpoint or an upgrade exports again, and a restart or a second server on the same cache
   does not.
2. Export once: `ensure_exported` runs a module's export function under a file lock into a scratch folder and
   renames it into CACHE_DIR/openvino/<name>-<digest>/, so concurrent servers export once and a crash leaves no
   half-written IR behind.
3. Compile: `compile_ir` compiles with float32 precision and torch's thread count; OpenVINO's own blob cache
   (CACHE_DIR/openvino/compiled) makes later compiles an import.
4. Route: `Routed` holds the compiled model beside the torch module's own forward and counts where each call ran;
   `install` replaces the module instance's `forward`, `uninstall` gives it back.

The module-specific parts (what is traced, which calls the graph covers) live in openvino_unet.py and
openvino_vae.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MethodType
from typing import Any

import diffusers
import numpy as np
import torch
from filelock import FileLock

logger = logging.getLogger(__name__)

ATTRIBUTE = "_sdserve_openvino"  # set on a routed module instance: its Routed


class OpenVinoMissing(RuntimeError):
    """The openvino package is not installed (it is the optional extra `openvino`)."""


def load_openvino() -> Any:
    try:
        import openvino
    except ImportError as error:
        raise OpenVinoMissing(
            "the OpenVINO backend needs the openvino package: pip install 'sdserve[openvino]' "
            "(or pip install openvino)"
        ) from error
    return openvino


def openvino_available() -> bool:
    try:
        load_openvino()
    except OpenVinoMissing:
        return False
    return True


# -- 1. identity ---------------------------------------------------------------------------------------------------
def weights_digest(config: dict[str, Any], module: torch.nn.Module, export_version: int) -> str:
    """A digest of what an exported graph depends on: config, every weight of `module`, the exporting code's
    version and the diffusers / OpenVINO versions."""
    openvino = load_openvino()
    digest = hashlib.sha256()
    digest.update(f"v{export_version}|diffusers {diffusers.__version__}|openvino {openvino.__version__}|".encode())
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"|{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# -- 2. export once --------------------------------------------------------------------------------------------------
def ensure_exported(cache_dir: Path, folder_name: str, ir_name: str, export: Callable[[Path], None],
                    about: dict[str, Any]) -> tuple[Path, bool]:
    """CACHE_DIR/openvino/<folder_name>, holding `ir_name`: made by `export(scratch_folder)` if no earlier run made
    it; and whether this call exported. `about` is written beside the IR (identity.json) for a person reading it."""
    target = Path(cache_dir) / "openvino" / folder_name
    if (target / ir_name).exists():
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / ir_name).exists():  # another process exported it while this one waited
            return target, False
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            export(scratch)
            (scratch / "identity.json").write_text(json.dumps(about, indent=2), encoding="utf-8")
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target, True


def save_ir(model: Any, path: Path, what: str, started: float) -> None:
    """Save an exported model with float32 weights: fp16 compression would change the images."""
    load_openvino().save_model(model, path, compress_to_fp16=False)
    logger.info("exported the %s to OpenVINO in %.1fs into %s", what, time.perf_counter() - started, path.parent)


# -- 3. compile ------------------------------------------------------------------------------------------------------
def compile_ir(ir: Path, cache_dir: Path, what: str) -> Any:
    openvino = load_openvino()
    blobs = Path(cache_dir) / "openvino" / "compiled"
    blobs.mkdir(parents=True, exist_ok=True)
    # f32 explicitly: on CPUs with bf16 units OpenVINO would otherwise pick bf16 and the images would drift.
    # As many threads as torch uses, so OMP_NUM_THREADS / torch.set_num_threads hold for the whole pipeline.
    config = {"CACHE_DIR": str(blobs), "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    started = time.perf_counter()
    compiled = openvino.Core().compile_model(str(ir), "CPU", config)
    logger.info("compiled the OpenVINO %s in %.1fs", what, time.perf_counter() - started)
    return compiled


# -- 4. routing calls ------------------------------------------------------------------------------------------------
def lora_active(module: torch.nn.Module) -> bool:
    """Whether a call through `module` (a diffusers model) would apply LoRA weights (adapters enabled and active, or
    merged in)."""
    if not getattr(module, "_hf_peft_config_loaded", False):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    for each in module.modules():
        if isinstance(each, BaseTunerLayer) and (each.merged or (not each.disable_adapters and each.active_adapters)):
            return True
    return False


@dataclass
class Routed:
    """A compiled model attached to a torch module; `calls` counts where each call ran."""

    what: str  # "UNet", "VAE decoder": for log lines
    module: torch.nn.Module
    torch_forward: Any  # the module's own bound forward, from before the replacement
    compiled: Any
    folder: Path
    exported: bool  # True when this load made the IR, False when it was found in the cache
    calls: dict[str, int] = field(default_factory=lambda: {"openvino": 0, "torch": 0})
    _request: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _told: set[str] = field(default_factory=set, repr=False)

    def on_torch(self, reason: str, *args: Any, **kwargs: Any) -> Any:
        """Run the call on the torch module, saying once per reason why."""
        self.calls["torch"] += 1
        if reason not in self._told:
            self._told.add(reason)
            logger.info("OpenVINO %s: %s; such calls run on torch", self.what, reason)
        return self.torch_forward(*args, **kwargs)

    def infer(self, inputs: list[np.ndarray]) -> torch.Tensor:
        """Run the compiled model on `inputs`; its first output as a tensor the caller owns."""
        self.calls["openvino"] += 1
        # Only the generation worker calls a pipeline, but the lock keeps the one infer request safe anyway.
        with self._lock:
            if self._request is None:
                self._request = self.compiled.create_infer_request()
            self._request.infer(inputs, share_inputs=True)
            # The request reuses its output buffer on the next call: copy it out.
            return torch.from_numpy(self._request.get_output_tensor(0).data.copy())

    def describe(self) -> str:
        return f"{self.what} ({'exported to' if self.exported else 'reused'} {self.folder})"


def install(module: torch.nn.Module, routed: Routed, forward: Callable[..., Any]) -> None:
    """Route every call of `module` through `forward`. An instance attribute wins over the class's forward in
    nn.Module.__call__, so every caller (the pipelines, from_pipe derivatives sharing the module, diffusers' tiling
    and slicing paths) goes through it, while PEFT, hooks and diffusers still see the real module."""
    module.forward = MethodType(lambda _module, *args, **kwargs: forward(*args, **kwargs), module)
    setattr(module, ATTRIBUTE, routed)


def routed_of(module: torch.nn.Module) -> Routed | None:
    return getattr(module, ATTRIBUTE, None)


def uninstall(module: torch.nn.Module) -> None:
    """Give the module its torch forward back."""
    if routed_of(module) is not None:
        del module.forward
        delattr(module, ATTRIBUTE)
