"""Full training's weights: every weight of the UNet and the text encoder (and, if asked, the VAE decoder) learns.

The loop asks the same four things of the weights it trains whether they are LoRA layers (`adapters.LoraWeights`)
or whole models (`FullWeights`, here): make them trainable, put them in a checkpoint and back, describe them in
the metadata, and write the result. A full run writes, in its output folder:

- `model/`: a diffusers folder, which `from_pretrained` loads and `--register` points the registry at;
- `model.safetensors`: the same pipeline packed in one file (`models/packed.py`), a function of the weights and
  the options only (no run id, time or path in it), so the same command, seed, machine and library versions
  give the same bytes;
- `manifest.json`: the packed file's sha256 and size, the command and options that reproduce it, the data it
  saw, the library versions and the machine it ran on.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from models.packed import pack_pipeline
from models.registry import Registry, RegistryEntry
from training.base_model import BaseChoice
from training.config import TextToImageOptions
from training.dataset_files import file_sha256

logger = logging.getLogger(__name__)

CHECKPOINT_WEIGHTS = "model_weights.safetensors"
MODEL_FOLDER = "model"
PACKED_NAME = "model.safetensors"
MANIFEST_NAME = "manifest.json"
LIBRARIES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "numpy", "pillow")
# Metadata that differs between two runs of the same command; kept in the manifest, out of the packed file.
RUN_ONLY_METADATA = ("run_id", "created_at")


class FullWeights:
    """The whole UNet and text encoder (and optionally the VAE decoder) as the trained weights of a run."""

    result_name = PACKED_NAME

    def __init__(self, options: TextToImageOptions, pipeline: StableDiffusionPipeline):
        self.options = options
        self.pipeline = pipeline
        self.trained: dict[str, torch.nn.Module] = {"unet": pipeline.unet}
        if options.train_text_encoder:
            self.trained["text_encoder"] = pipeline.text_encoder
        if options.train_vae_decoder:
            self.trained["vae"] = pipeline.vae

    def attach(self) -> None:
        """Make the trained parts trainable; the VAE encoder stays frozen, so the latents do not move."""
        for module in self.trained.values():
            module.requires_grad_(True)
        if "vae" in self.trained:
            vae = self.pipeline.vae
            for frozen in (vae.encoder, vae.quant_conv):
                if frozen is not None:
                    frozen.requires_grad_(False)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{key}": tensor.detach().to("cpu").contiguous()
                for name, module in self.trained.items() for key, tensor in module.state_dict().items()}

    def save_checkpoint(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.state(), str(folder / CHECKPOINT_WEIGHTS))

    def load_checkpoint(self, folder: Path) -> None:
        tensors = load_file(str(folder / CHECKPOINT_WEIGHTS))
        for name, module in self.trained.items():
            part = {key.removeprefix(f"{name}."): value for key, value in tensors.items() if key.startswith(f"{name}.")}
            module.load_state_dict(part, strict=True)

    def describe(self) -> dict[str, str]:
        options = self.options
        return {
            "trained": json.dumps(sorted(self.trained)),
            "from_scratch": options.from_scratch or "",
            "caption_dropout": str(options.caption_dropout),
            "parameters": str(sum(p.numel() for m in self.trained.values() for p in m.parameters())),
        }

    def save_result(self, folder: Path, metadata: dict[str, str]) -> Path:
        """The diffusers folder, the packed file and its manifest; returns the packed file."""
        self.pipeline.save_pretrained(folder / MODEL_FOLDER, safe_serialization=True)
        packed = pack_pipeline(self.pipeline, folder / PACKED_NAME,
                               {key: value for key, value in metadata.items() if key not in RUN_ONLY_METADATA})
        manifest = build_manifest(packed, self.options, metadata)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s (%d bytes, sha256 %s) and %s", packed, manifest["bytes"], manifest["sha256"],
                    MANIFEST_NAME)
        return packed

    def register(self, registry: Registry, base: BaseChoice, weights: Path, run_id: str,
                 trigger_words: list[str]) -> None:
        """A `base` entry for the diffusers folder: any request can name the new model."""
        options = self.options
        assert options.register_as is not None
        entry = RegistryEntry(
            kind="base",
            source=str((weights.parent / MODEL_FOLDER).resolve()),
            trigger_words=trigger_words,
            sha256=file_sha256(weights),
            created_by=run_id,
            created_at=datetime.now(timezone.utc).replace(microsecond=0),
            description=options.description or f"text-to-image model trained by run {run_id} from {base.label}",
        )
        registry.register(options.register_as, entry, replace=options.register_replace)
        logger.info("registered %r (%s) in %s", options.register_as, entry.source, registry.path)


def build_manifest(packed: Path, options: TextToImageOptions, metadata: dict[str, str]) -> dict[str, Any]:
    """What the packed file is and how to make it again."""
    return {
        "file": packed.name,
        "sha256": file_sha256(packed),
        "bytes": packed.stat().st_size,
        "command": command_line(),
        "options": options.model_dump(mode="json", exclude_defaults=True, by_alias=False),
        "seed": metadata.get("seed"),
        "metadata": metadata,
        "libraries": {name: _version(name) for name in LIBRARIES},
        "python": platform.python_version(),
        "machine": {"platform": platform.platform(), "processor": _processor(), "torch_threads":
                    torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
    }


def command_line() -> str:
    """This process's command as someone in the project folder would type it (thread count included: it changes
    the arithmetic's order, so the last bits of the weights)."""
    script = Path(sys.argv[0]).resolve()
    root = Path(__file__).resolve().parent.parent
    shown = str(script.relative_to(root)) if script.is_relative_to(root) else sys.argv[0]
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = [f"OMP_NUM_THREADS={threads}"] if threads else []
    return " ".join([*prefix, "python", *(shlex.quote(part) for part in [shown, *sys.argv[1:]])])


def _version(name: str) -> str | None:
    try:
        return package_metadata.version(name)
    except package_metadata.PackageNotFoundError:
        return None


def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
