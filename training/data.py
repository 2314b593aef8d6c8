"""Training data: finding captioned images, hashing them, and turning them into tensors.

Three layouts give (image, caption) pairs: a folder with `metadata.jsonl` (one JSON object per line with
`file_name` and `text`), a folder of images each with a same-name `.txt` caption, or a CSV file with the same two
columns. DreamBooth reads plain image folders and gives every image one prompt.

Random crops and flips are drawn from a generator seeded by (seed, epoch, index), not from a global one: an
image gets the same augmentation whether the run went straight through or was resumed from a checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from models.errors import InvalidRequest

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"


class DatasetError(InvalidRequest):
    """The dataset is missing, empty or malformed; the message names the file and line."""


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str
    prior: bool = False  # a DreamBooth class image (prior preservation), weighted apart in the loss


# -- finding examples --------------------------------------------------------------------------------------------
def find_captioned_images(
    source: Path, image_column: str = "file_name", caption_column: str = "text", caption_extension: str = ".txt"
) -> list[Example]:
    """(image, caption) pairs of a metadata.jsonl folder, a .txt-caption folder or a CSV file."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        examples = _from_csv(source, image_column, caption_column)
    elif source.is_dir() and (source / METADATA_FILE).is_file():
        examples = _from_metadata(source / METADATA_FILE, image_column, caption_column)
    elif source.is_dir():
        examples = _from_caption_files(source, caption_extension)
    elif source.exists():
        raise DatasetError(f"dataset {source} is neither a folder nor a .csv file")
    else:
        raise DatasetError(f"dataset {source} does not exist")
    if not examples:
        raise DatasetError(f"dataset {source} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return examples


def find_images(folder: Path, what: str = "image folder") -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{what} {folder} does not exist or is not a folder")
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())


def _from_metadata(path: Path, image_column: str, caption_column: str) -> list[Example]:
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path} line {number}: not JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise DatasetError(f"{path} line {number}: expected an object with {image_column!r} and {caption_column!r}")
        examples.append(_row_example(row, path, number, image_column, caption_column))
    return examples


def _from_csv(path: Path, image_column: str, caption_column: str) -> list[Example]:
    with path.open(newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = {image_column, caption_column} - set(reader.fieldnames or [])
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(sorted(missing))}; found {reader.fieldnames}")
        # Line 1 is the header.
        return [_row_example(row, path, number, image_column, caption_column) for number, row in enumerate(reader, 2)]


def _row_example(row: dict[str, Any], path: Path, number: int, image_column: str, caption_column: str) -> Example:
    file_name, caption = row.get(image_column), row.get(caption_column)
    if not isinstance(file_name, str) or not file_name:
        raise DatasetError(f"{path} line {number}: no {image_column!r}")
    if not isinstance(caption, str):
        raise DatasetError(f"{path} line {number}: no {caption_column!r} caption")
    image = _inside(path.parent, file_name, f"{path} line {number}")
    if not image.is_file():
        raise DatasetError(f"{path} line {number}: image {file_name} not found")
    return Example(image=image, caption=caption.strip())


def _inside(folder: Path, relative: str, where: str) -> Path:
    """Dataset rows name files inside the dataset folder; '../' or absolute paths would read elsewhere."""
    candidate = (folder / relative).resolve()
    if not candidate.is_relative_to(folder.resolve()):
        raise DatasetError(f"{where}: {relative} points outside the dataset folder")
    return candidate


def _from_caption_files(folder: Path, caption_extension: str) -> list[Example]:
    examples, uncaptioned = [], []
    for image in find_images(folder, "dataset"):
        caption_file = image.with_suffix(caption_extension)
        if caption_file.is_file():
            examples.append(Example(image=image, caption=caption_file.read_text(encoding="utf-8").strip()))
        else:
            uncaptioned.append(image.name)
    if uncaptioned:
        shown = ", ".join(uncaptioned[:5]) + (" ..." if len(uncaptioned) > 5 else "")
        raise DatasetError(
            f"dataset {folder}: {len(uncaptioned)} image(s) have no {caption_extension} caption ({shown}); "
            f"add one per image or describe them all in {METADATA_FILE}"
        )
    return examples


def dataset_sha256(examples: Sequence[Example], extra: str = "") -> str:
    """Identifies the training data: every image's bytes and caption, in order, plus `extra` (e.g. a prompt)."""
    digest = hashlib.sha256(extra.encode())
    for example in examples:
        digest.update(file_sha256(example.image).encode())
        digest.update(b"\0" + example.caption.encode() + (b"\1" if example.prior else b"\0"))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- tensors ----------------------------------------------------------------------------------------------------
def load_image(path: Path, resolution: int, crop: str, flip: bool, rng: random.Random) -> torch.Tensor:
    """Resize the short side to `resolution`, cut a square, maybe flip; a CHW tensor in [-1, 1]."""
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    if crop == "random":
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    else:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


class ImageCaptionDataset(Dataset):
    """Examples as tensors: pixels, or VAE latents once `cache_latents` has run."""

    def __init__(self, examples: Sequence[Example], resolution: int, crop: str, random_flip: bool, seed: int):
        self.examples = list(examples)
        self.resolution = resolution
        self.crop = crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self._latents: list[list[torch.Tensor]] | None = None  # per example: [as is, mirrored]

    def __len__(self) -> int:
        return len(self.examples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.examples[index]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}:{int(example.prior)}")
        item: dict[str, Any] = {"prompt": example.caption, "prior": example.prior}
        if self._latents is not None:
            variants = self._latents[index]
            item["latents"] = variants[1] if self.random_flip and rng.random() < 0.5 else variants[0]
        else:
            item["pixel_values"] = load_image(example.image, self.resolution, self.crop, self.random_flip, rng)
        return item

    def cache_latents(self, encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 8) -> None:
        """Encode every image once (and its mirror image when flipping), so steps skip the VAE."""
        center = random.Random(0)  # crop is "center" here: the generator is never drawn from
        pixels = [load_image(example.image, self.resolution, "center", False, center) for example in self.examples]
        variants = [pixels] + ([[torch.flip(p, dims=[2]) for p in pixels]] if self.random_flip else [])
        encoded = []
        for images in variants:
            batches = [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
            encoded.append([latent.cpu() for batch in batches for latent in encode(batch)])
        self._latents = [[variant[i] for variant in encoded] for i in range(len(self.examples))]
        logger.info("cached latents of %d images (%d variants each)", len(self.examples), len(variants))


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
    """Stacks examples (a paired item counts as two) and tokenizes their prompts."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any] | tuple[dict[str, Any], ...]]) -> dict[str, torch.Tensor]:
        examples = [example for item in items for example in (item if isinstance(item, tuple) else (item,))]
        key = "latents" if "latents" in examples[0] else "pixel_values"
        input_ids = self.tokenizer(
            [example["prompt"] for example in examples],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {
            key: torch.stack([example[key] for example in examples]).contiguous(),
            "input_ids": input_ids,
            "prior": torch.tensor([example["prior"] for example in examples], dtype=torch.bool),
        }
