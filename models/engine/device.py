"""Device and dtype, chosen once at start-up."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from models.settings import Settings

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device
    dtype: torch.dtype
    use_xformers: bool
    low_memory: bool

    def describe(self) -> dict[str, str | bool]:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": "xformers" if self.use_xformers else "sdpa",
            "low_memory": self.low_memory,
        }


def select_device(settings: Settings) -> DeviceConfig:
    name = settings.device
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SDSERVE_DEVICE=cuda but no CUDA device is visible")
    if settings.dtype != "auto":
        dtype = _DTYPES[settings.dtype]
    elif name == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() and settings.prefer_bf16 else torch.float16
    elif name == "mps":
        dtype = torch.float16
    else:
        dtype = torch.float32
    has_xformers = importlib.util.find_spec("xformers") is not None
    use_xformers = name == "cuda" and settings.attention != "sdpa" and has_xformers
    if settings.attention == "xformers" and not use_xformers:
        logger.warning("SDSERVE_ATTENTION=xformers but xformers is not usable on %s; using SDPA", name)
    config = DeviceConfig(torch.device(name), dtype, use_xformers, settings.low_memory)
    logger.info("device %s", config.describe())
    return config
