"""Training data as tensors: images resized, cropped and flipped, optionally encoded once (latent caching).

Random crops and flips are drawn from a generator seeded by (seed, epoch, index), not from a global one: an
image gets the same augmentation whether the run went straight through or was resumed from a checkpoint.
Each example also carries SDXL's size conditioning ("time ids": original size, crop corner, target size), which
SD 1.x runs ignore.

Aspect-ratio buckets, as kohya's trainers make them: a table of sizes (width x height, sides multiples of a step)
whose area is at most resolution^2; each image is resized to cover the bucket nearest its shape and only the few
pixels left over are cropped, so a tall or wide picture keeps its subject instead of losing it to a square crop.
`BucketBatchSampler` draws every batch from one bucket.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from training.dataset_files import DatasetError, Example

logger = logging.getLogger(__name__)


Size = tuple[int, int]  # (width, height) in pixels


# -- buckets ----------------------------------------------------------------------------------------------------
def bucket_table(resolution: int, step: int, min_side: int | None = None, max_side: int | None = None) -> list[Size]:
    """Every (width, height) with sides multiples of `step` between the shortest and longest side (default half
    and twice the resolution) and an area of at most resolution^2, the tallest such height for each width; from
    the tallest shape to the widest."""
    area = resolution * resolution
    low = max(step, math.ceil((min_side or resolution // 2) / step) * step)
    high = (max_side or resolution * 2) // step * step
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes.add((width, height))
    return sorted(sizes, key=lambda size: size[0] / size[1])


def nearest_bucket(size: Size, table: Sequence[Size]) -> Size:
    """The bucket whose shape (log aspect ratio) is nearest the image's; on a tie, the larger one."""
    ratio = math.log(size[0] / size[1])
    return min(table, key=lambda bucket: (abs(math.log(bucket[0] / bucket[1]) - ratio), -bucket[0] * bucket[1]))


def image_size(path: Path) -> Size:
    """(width, height) as the image will be trained (EXIF rotation applied), from its header only."""
    try:
        with Image.open(path) as opened:
            width, height = opened.size
            # Orientations 5 to 8 turn the picture a quarter: exif_transpose will swap its sides.
            rotated = opened.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
    return (height, width) if rotated else (width, height)


class BucketBatchSampler:
    """Batches of indices from one bucket each. Every epoch each bucket's examples are shuffled and cut into
    batches (a bucket's last one may be short), then all batches are shuffled together: a function of (seed,
    epoch) alone, so a resumed run sees the very same batches."""

    # Batches differ in length, so accelerate must treat each as a whole (it shards them between processes as
    # they are, and never tops one up with images of another bucket).
    batch_size = None
    drop_last = False

    def __init__(self, sizes: Sequence[Size], images_per_batch: int, seed: int):
        self.groups: dict[Size, list[int]] = defaultdict(list)
        for index, size in enumerate(sizes):
            self.groups[size].append(index)
        self.images_per_batch = images_per_batch
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(indices) / self.images_per_batch) for indices in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"buckets:{self.seed}:{self.epoch}")
        batches = []
        for size in sorted(self.groups):
            indices = list(self.groups[size])
            rng.shuffle(indices)
            batches += [indices[start : start + self.images_per_batch]
                        for start in range(0, len(indices), self.images_per_batch)]
        rng.shuffle(batches)
        return iter(batches)


# -- tensors ----------------------------------------------------------------------------------------------------
def load_image(
    path: Path, size: Size, crop: str, flip: bool, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to cover `size` (width, height), cut it out, maybe flip: a CHW tensor in [-1, 1], and SDXL's time
    ids for it: (original height, width, crop top, left (in the resized image, as seen after a flip), target
    height, width). For a square size this is the usual short side to the resolution and a square crop."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
    width, height = size
    original_width, original_height = image.size
    image = image.resize(_covering(image.size, size), Image.Resampling.BICUBIC)
    if crop == "random":
        left, top = rng.randint(0, image.width - width), rng.randint(0, image.height - height)
    else:
        left, top = (image.width - width) // 2, (image.height - height) // 2
    resized_width = image.width
    image = image.crop((left, top, left + width, top + height))
    if flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
        left = resized_width - left - width
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    time_ids = torch.tensor([original_height, original_width, top, left, height, width], dtype=torch.float32)
    return pixels / 127.5 - 1.0, time_ids


def _covering(original: Size, size: Size) -> Size:
    """The smallest resize of `original` (aspect kept) that covers `size`."""
    scale = max(size[0] / original[0], size[1] / original[1])
    return max(size[0], round(original[0] * scale)), max(size[1], round(original[1] * scale))


def drops_caption(seed: int, epoch: int, index: int, share: float) -> bool:
    """Whether example `index` trains with the empty prompt this epoch (classifier-free guidance learns from those);
    a function of (seed, epoch, index) only, so a resumed run drops the same captions."""
    return share > 0 and random.Random(f"drop:{seed}:{epoch}:{index}").random() < share


class ImageCaptionDataset(Dataset):
    """Examples as tensors: pixels, or VAE latents once `cache_latents` has run. Each example is trained at its
    size: the square `resolution` unless `use_sizes` gave it a bucket."""

    def __init__(self, examples: Sequence[Example], resolution: int, crop: str, random_flip: bool, seed: int,
                 caption_dropout: float = 0.0):
        self.examples = list(examples)
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.seed = seed
        self.caption_dropout = caption_dropout
        self.epoch = 0
        self.sizes: list[Size] = [(resolution, resolution)] * len(self.examples)
        # (example, size, mirrored) -> (latents, time ids); a class image of DreamBooth has one entry per bucket.
        self._latents: dict[tuple[int, Size, bool], tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def use_sizes(self, sizes: Sequence[Size]) -> None:
        """Train example i at sizes[i] (its bucket)."""
        if len(sizes) != len(self.examples):
            raise ValueError(f"{len(sizes)} sizes for {len(self.examples)} examples")
        self.sizes = list(sizes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, self.sizes[index])

    def item(self, index: int, size: Size) -> dict[str, Any]:
        example = self.examples[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}:{int(example.prior)}")
        dropped = drops_caption(self.seed, self.epoch, index, self.caption_dropout)
        item: dict[str, Any] = {"prompt": "" if dropped else example.caption, "prior": example.prior}
        if self._latents is not None:
            mirrored = self.random_flip and rng.random() < 0.5
            item["latents"], item["time_ids"] = self._latents[(index, size, mirrored)]
        else:
            item["pixel_values"], item["time_ids"] = load_image(example.image, size, self.crop, self.random_flip,
                                                                rng)
        return item

    def cache_latents(
        self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8, sizes: Sequence[Size] | None = None
    ) -> None:
        """Encode every image once (and its mirror image when flipping) at its own size, or at each of `sizes`,
        so steps skip the VAE. Images are encoded in batches of one size."""
        center = random.Random(0)  # crop is "center" here: the generator is never drawn from
        wanted = [(index, size) for index in range(len(self.examples))
                  for size in ([self.sizes[index]] if sizes is None else sorted(set(sizes)))]
        by_size: dict[Size, list[int]] = defaultdict(list)
        for index, size in wanted:
            by_size[size].append(index)
        cache: dict[tuple[int, Size, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        mirrors = (False, True) if self.random_flip else (False,)
        for size, indices in sorted(by_size.items()):
            loaded = [load_image(self.examples[index].image, size, "center", False, center) for index in indices]
            for mirrored in mirrors:
                # The mirrored centre crop starts as far from the right edge as the crop did from the left.
                pixels = [torch.flip(p, dims=[2]) if mirrored else p for p, _ in loaded]
                time_ids = [_mirrored(ids) if mirrored else ids for _, ids in loaded]
                latents = [latent.cpu() for start in range(0, len(pixels), batch_size)
                           for latent in encode(torch.stack(pixels[start : start + batch_size]))]
                for index, latent, ids in zip(indices, latents, time_ids, strict=True):
                    cache[(index, size, mirrored)] = (latent, ids)
        self._latents = cache
        logger.info("cached latents of %d images at %d size(s) (%d variants each)", len(self.examples),
                    len(by_size), len(mirrors))


def _mirrored(time_ids: torch.Tensor) -> torch.Tensor:
    original_height, original_width, top, left, height, width = time_ids.tolist()
    resized_width = _covering((round(original_width), round(original_height)), (round(width), round(height)))[0]
    mirrored = time_ids.clone()
    mirrored[3] = resized_width - left - width
    return mirrored


class PairedDataset(Dataset):
    """DreamBooth with prior preservation: each item is an instance example and a class example, the class image
    at the instance's size (its bucket), so the two stack into one batch."""

    def __init__(self, instances: ImageCaptionDataset, classes: ImageCaptionDataset):
        self.instances = instances
        self.classes = classes

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    @property
    def sizes(self) -> list[Size]:
        return [self.instances.sizes[index % len(self.instances)] for index in range(len(self))]

    def set_epoch(self, epoch: int) -> None:
        self.instances.set_epoch(epoch)
        self.classes.set_epoch(epoch)

    def __getitem__(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        instance = index % len(self.instances)
        size = self.instances.sizes[instance]
        return self.instances.item(instance, size), self.classes.item(index % len(self.classes), size)

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8) -> None:
        self.instances.cache_latents(encode, batch_size)
        self.classes.cache_latents(encode, batch_size, sizes=self.instances.sizes)


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
