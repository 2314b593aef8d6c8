"""Finding training data on disk and identifying it: captioned images, image folders, hashes. No torch here, so
the scripts and the API check a dataset at once, before anything heavy is imported or loaded.

Three layouts give (image, caption) pairs: a folder with `metadata.jsonl` (one JSON object per line with
`file_name` and `text`), a folder of images each with a same-name `.txt` caption, or a CSV file with the same two
columns. DreamBooth reads plain image folders and gives every image one prompt.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.errors import InvalidRequest

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
    """The images of a folder, each resolved: a symlink that leads out of the folder is refused, as a
    metadata.jsonl or CSV row naming a file outside it is."""
    return [image for _, image in _images(Path(folder), what)]


def _images(folder: Path, what: str) -> list[tuple[str, Path]]:
    """(name in the folder, resolved file) of each image."""
    if not folder.is_dir():
        raise DatasetError(f"{what} {folder} does not exist or is not a folder")
    names = sorted(path.name for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    found = [(name, _inside(folder, name, f"{what} {folder}")) for name in names]
    return [(name, image) for name, image in found if image.is_file()]


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
    if file_name is None and image_column == "image":
        # diffusers' scripts read folders with datasets' imagefolder, which turns file_name into an "image" column.
        file_name = row.get("file_name")
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
    for name, image in _images(folder, "dataset"):
        caption_file = _inside(folder, Path(name).with_suffix(caption_extension).name, f"dataset {folder}")
        if caption_file.is_file():
            examples.append(Example(image=image, caption=caption_file.read_text(encoding="utf-8").strip()))
        else:
            uncaptioned.append(name)
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
