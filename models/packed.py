"""One-file pipelines: a whole small Stable Diffusion pipeline in one .safetensors file, and back.

A diffusers folder holds a weights file per component, their configs and the tokenizer's files. A model small
enough to keep in the repository is kept as one file instead: the tensors of every component under its name
(`unet.*`, `text_encoder.*`, `vae.*`), and in the safetensors metadata one JSON document (`sdserve.pipeline`)
with each component's class and config, the scheduler's config, the tokenizer's vocabulary and merges, and what
made the weights (`metadata`: the training options, seed, data). Nothing
in the file can run code (safetensors holds tensors and strings); the classes named in it must be among the few
this module knows.

`pack_pipeline` writes such a file (the training scripts do, for a model trained from scratch); `unpack_pipeline`
builds the pipeline from it (the `demo:shapes` builtin does, before saving it as a diffusers folder in the cache).
The file is byte-for-byte a function of the weights and metadata: no time stamps, keys in sorted order.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PIPELINE_KEY = "sdserve.pipeline"
FORMAT = "sdserve-packed-pipeline/1"
MODELS = ("unet", "text_encoder", "vae")
# The only classes a packed file may name: nothing is imported by a name read from a file.
_MODEL_CLASSES: dict[str, type] = {"UNet2DConditionModel": UNet2DConditionModel, "AutoencoderKL": AutoencoderKL,
                                   "CLIPTextModel": CLIPTextModel}
_SCHEDULER_CLASSES: dict[str, type] = {cls.__name__: cls for cls in (
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler)}


class PackedFileError(ValueError):
    """The file is not a packed pipeline this version can read; the message says what is wrong."""


def pack_pipeline(pipeline: StableDiffusionPipeline, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write `pipeline` (UNet, CLIP text encoder, AutoencoderKL, CLIP tokenizer, scheduler) as one file."""
    tensors: dict[str, torch.Tensor] = {}
    description: dict[str, Any] = {"format": FORMAT, "components": {}}
    for name in MODELS:
        module = getattr(pipeline, name)
        cls = type(module).__name__
        if cls not in _MODEL_CLASSES:
            raise PackedFileError(f"cannot pack a {cls} as {name}; packable: {', '.join(_MODEL_CLASSES)}")
        config = module.config.to_dict() if name == "text_encoder" else dict(module.config)
        description["components"][name] = {"class": cls, "config": _plain(config)}
        for key, tensor in module.state_dict().items():
            tensors[f"{name}.{key}"] = tensor.detach().to("cpu", torch.float32).contiguous()
    scheduler = pipeline.scheduler
    description["components"]["scheduler"] = {"class": type(scheduler).__name__,
                                              "config": _plain(dict(scheduler.config))}
    vocab, merges = _bpe_tables(pipeline.tokenizer)
    description["components"]["tokenizer"] = {"class": "CLIPTokenizer", "vocab": vocab, "merges": merges,
                                              "model_max_length": pipeline.tokenizer.model_max_length}
    description["metadata"] = {key: str(value) for key, value in (metadata or {}).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry: safetensors writes its metadata map in no fixed order, so several entries would make
    # two writes of the same model differ.
    header = {PIPELINE_KEY: json.dumps(description, sort_keys=True)}
    save_file(dict(sorted(tensors.items())), str(path), metadata=header)
    return path


def read_description(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The pipeline description and the metadata stored with it (what trained it) of a packed file."""
    with safe_open(str(path), framework="pt") as stream:
        header = stream.metadata() or {}
    if PIPELINE_KEY not in header:
        raise PackedFileError(f"{path} is not a packed pipeline (no {PIPELINE_KEY} metadata)")
    description = json.loads(header[PIPELINE_KEY])
    if description.get("format") != FORMAT:
        raise PackedFileError(f"{path} is a packed pipeline of format {description.get('format')!r}; "
                              f"this version reads {FORMAT!r}")
    return description, description.get("metadata", {})


def unpack_pipeline(path: Path) -> StableDiffusionPipeline:
    """The pipeline a packed file describes, with its weights loaded (strictly: every tensor must fit)."""
    description, _ = read_description(path)
    components = description["components"]
    tensors = load_file(str(path))
    modules: dict[str, torch.nn.Module] = {}
    for name in MODELS:
        spec = components[name]
        cls = _MODEL_CLASSES.get(spec["class"])
        if cls is None:
            raise PackedFileError(f"{path}: unknown {name} class {spec['class']!r}")
        if cls is CLIPTextModel:
            module = CLIPTextModel(CLIPTextConfig.from_dict(spec["config"]))
        else:
            module = cls.from_config(spec["config"])
        state = {key.removeprefix(f"{name}."): value for key, value in tensors.items() if key.startswith(f"{name}.")}
        module.load_state_dict(state, strict=True)
        modules[name] = module.eval()
    scheduler_spec = components["scheduler"]
    scheduler_cls = _SCHEDULER_CLASSES.get(scheduler_spec["class"])
    if scheduler_cls is None:
        raise PackedFileError(f"{path}: unknown scheduler class {scheduler_spec['class']!r}")
    tokenizer_spec = components["tokenizer"]
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "vocab.json").write_text(json.dumps(tokenizer_spec["vocab"]), encoding="utf-8")
        Path(scratch, "merges.txt").write_text(tokenizer_spec["merges"], encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(scratch, model_max_length=tokenizer_spec["model_max_length"])
    return StableDiffusionPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=tokenizer, unet=modules["unet"],
        scheduler=scheduler_cls.from_config(scheduler_spec["config"]), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )


def _bpe_tables(tokenizer: CLIPTokenizer) -> tuple[dict[str, int], str]:
    """The vocabulary and merges.txt text of a CLIP tokenizer, from whichever files its version saves."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        folder = Path(scratch)
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            return vocab, (folder / "merges.txt").read_text(encoding="utf-8")
        model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    pairs = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return model["vocab"], "#version: 0.2\n" + "".join(f"{pair}\n" for pair in pairs)


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """A config as JSON-able values, without the keys a library adds about itself (versions, paths)."""
    skip = {"_diffusers_version", "_name_or_path", "transformers_version", "_commit_hash"}
    kept = {key: value for key, value in config.items() if key not in skip}
    # diffusers lists the defaulted keys from a set, in an order that changes with each process's string hashing:
    # sorted, the same model gives the same bytes in any process.
    if "_use_default_values" in kept:
        kept["_use_default_values"] = sorted(kept["_use_default_values"])
    return json.loads(json.dumps(kept, default=lambda value: sorted(value) if isinstance(value, set | frozenset)
                                 else list(value)))
