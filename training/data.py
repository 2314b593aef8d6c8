"""Training data as tensors: images resized, cropped and flipped, optionally encoded once (latent caching).

Random crops and flips are drawn from a generator seeded by (seed, epoch, index), not from a global one: an
image gets the same augmentation whether the run went straight through or was resumed from a checkpoint.
Each example also carries SDXL's size conditioning ("time ids": original size, crop corner, target size), which
SD 1.x runs ignore.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from training.dataset_files import DatasetError, Example

logger = logging.getLogger(__name__)


# -- tensors ----------------------------------------------------------------------------------------------------
def load_image(
    path: Path, resolution: int, crop: str, flip: bool, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the short side to `resolution`, cut a square, maybe flip: a CHW tensor in [-1, 1], and SDXL's time
    ids for it: (original height, width, crop top, left (in the resized image, as seen after a flip), target
    height, width)."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
    original_width, original_height = image.size
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    if crop == "random":
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    else:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    resized_width = image.width
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
        left = resized_width - left - resolution
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    time_ids = torch.tensor([original_height, original_width, top, left, resolution, resolution], dtype=torch.float32)
    return pixels / 127.5 - 1.0, time_ids


def drops_caption(seed: int, epoch: int, index: int, share: float) -> bool:
    """Whether example `index` trains with the empty prompt this epoch (classifier-free guidance learns from those);
    a function of (seed, epoch, index) only, so a resumed run drops the same captions."""
    return share > 0 and random.Random(f"drop:{seed}:{epoch}:{index}").random() < share


class ImageCaptionDataset(Dataset):
    """Examples as tensors: pixels, or VAE latents once `cache_latents` has run."""

    def __init__(self, examples: Sequence[Example], resolution: int, crop: str, random_flip: bool, seed: int,
                 caption_dropout: float = 0.0):
        self.examples = list(examples)
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.epoch = 0
        # Per example: [as is, mirrored], each (latents, time ids).
        self._latents: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}:{int(example.prior)}")
        dropped = drops_caption(self.seed, self.epoch, index, self.caption_dropout)
        item: dict[str, Any] = {"prompt": "" if dropped else example.caption, "prior": example.prior}
        if self._latents is not None:
            variants = self._latents[index]
            item["latents"], item["time_ids"] = variants[1] if self.random_flip and rng.random() < 0.5 else variants[0]
        else:
            item["pixel_values"], item["time_ids"] = load_image(example.image, self.resolution, self.crop,
                                                                self.random_flip, rng)
        return item

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8) -> None:
        """Encode every image once (and its mirror image when flipping), so steps skip the VAE."""
        center = random.Random(0)  # crop is "center" here: the generator is never drawn from
        loaded = [load_image(example.image, self.resolution, "center", False, center) for example in self.examples]
        pixels = [image for image, _ in loaded]
        time_ids = [ids for _, ids in loaded]
        variants = [(pixels, time_ids)]
        if self.random_flip:
            # The mirrored centre crop starts as far from the right edge as the crop did from the left.
            variants.append(([torch.flip(p, dims=[2]) for p in pixels], [_mirrored(ids) for ids in time_ids]))
        encoded = []
        for images, ids in variants:
            batches = [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
            latents = [latent.cpu() for batch in batches for latent in encode(batch)]
            encoded.append(list(zip(latents, ids, strict=True)))
        self._latents = [[variant[i] for variant in encoded] for i in range(len(self.examples))]
        logger.info("cached latents of %d images (%d variants each)", len(self.examples), len(variants))


def _mirrored(time_ids: torch.Tensor) -> torch.Tensor:
    original_height, original_width, top, left, height, width = time_ids.tolist()
    resized_width = round(original_width * height / min(original_height, original_width))
    mirrored = time_ids.clone()
    mirrored[3] = max(resized_width, width) - left - width
    return mirrored


class PairedDataset(Dataset):
    """DreamBooth with prior preservation: each item is an instance example and a class example."""

    def __init__(self, instances: ImageCaptionDataset, classes: ImageCaptionDataset):
        self.instances = instances
        self.classes = classes

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def set_epoch(self, epoch: int) -> None:
        self.instances.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.instances[index % len(self.instances)], self.classes[index % len(self.classes)]

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8) -> None:
        self.instances.cache_latents(encode, batch_size)
        self.classes.cache_latents(encode, batch_size)


class Collate:
    """Stacks examples (a paired item counts as two) and tokenizes their prompts, once per text encoder's tokenizer
    (`input_ids`, then `input_ids_2` for SDXL's second encoder)."""

    def __init__(self, *tokenizers: Any):
        self.tokenizers = tokenizers

    def __call__(self, items: list[dict[str, Any] | tuple[dict[str, Any], ...]]) -> dict[str, torch.Tensor]:
        examples = [example for item in items for example in (item if isinstance(item, tuple) else (item,))]
        key = "latents" if "latents" in examples[0] else "pixel_values"
        batch = {
            key: torch.stack([example[key] for example in examples]).contiguous(),
            "time_ids": torch.stack([example["time_ids"] for example in examples]),
            "prior": torch.tensor([example["prior"] for example in examples], dtype=torch.bool),
        }
        for number, tokenizer in enumerate(self.tokenizers, start=1):
            batch["input_ids" if number == 1 else f"input_ids_{number}"] = tokenizer(
                [example["prompt"] for example in examples],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        return batch
