"""Datasets uploaded through the API: checked, unpacked into `<datasets_dir>/<name>`, listed and deleted.

An upload is a zip file, or images with their `.txt` captions (or a `metadata.jsonl`) sent one by one. Nothing of
it reaches the datasets folder before all of it has been checked, in this order:

1. Names: plain relative paths only. A zip member with an absolute name, a drive letter, a backslash or a `..`
   part, a symlink or any other special file is refused; so is a file sent twice.
2. Limits: the number of files and the bytes they unpack to (`dataset_max_files`, `dataset_max_bytes`), counted
   while unpacking as well as from the zip's own (untrusted) sizes, and each image's pixels
   (`dataset_max_image_pixels`).
3. Contents: every image is decoded with PIL, every caption and metadata.jsonl read as UTF-8, and the folder must
   be a dataset the training scripts read (captioned: train_lora.py; plain images: DreamBooth's
   instance_data_dir). Any other kind of file is refused.

It is unpacked into a hidden staging folder inside the datasets folder (opened with O_EXCL, so no file is written
through a link) and renamed into place only once checked; on any problem the staging folder is removed. macOS and
Windows clutter (`__MACOSX/`, `._*`, `.DS_Store`, `Thumbs.db`) is skipped. Nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from models.errors import Conflict, DatasetNotFound, PayloadTooLarge
from models.settings import Settings
from models.sources import is_valid_name
from training.dataset_files import IMAGE_SUFFIXES, METADATA_FILE, DatasetError, find_captioned_images, find_images

logger = logging.getLogger(__name__)

CAPTION_SUFFIX = ".txt"
CHUNK = 1 << 20
STAGING_PREFIX = ".incoming-"
_CLUTTER_FILES = {".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Upload:
    """One uploaded file: the name the client gave it and its bytes."""

    filename: str
    stream: BinaryIO


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    path: Path
    layout: str  # "metadata.jsonl", "captions" (same-name .txt files) or "images" (no captions: DreamBooth)
    images: int
    captioned: int  # images with a caption (train_lora.py reads only a dataset where all are)
    bytes: int
    created_at: float


class DatasetStore:
    """The folders of `settings.datasets_dir`. `in_use(path)` names a queued or running training run reading
    `path`, which may then not be deleted or replaced."""

    def __init__(self, settings: Settings, in_use: Callable[[Path], str | None] = lambda path: None):
        self.root = Path(settings.datasets_dir).expanduser()
        self.max_bytes = settings.dataset_max_bytes
        self.max_files = settings.dataset_max_files
        self.max_pixels = settings.dataset_max_image_pixels
        self.in_use = in_use

    # -- reading ------------------------------------------------------------------------------------------------
    def list(self) -> list[DatasetInfo]:
        if not self.root.is_dir():
            return []
        folders = sorted(path for path in self.root.iterdir()
                         if is_valid_name(path.name) and not path.is_symlink() and path.is_dir())
        found = []
        for folder in folders:
            try:
                found.append(describe(folder))
            except DatasetError as error:  # e.g. a hand-made folder with a link leading out of it
                logger.warning("not listing dataset %s: %s", folder, error)
        return found

    def get(self, name: str) -> DatasetInfo:
        return describe(self._folder(name))

    def _folder(self, name: str) -> Path:
        folder = self.root / name
        if not is_valid_name(name) or folder.is_symlink() or not folder.is_dir():
            raise DatasetNotFound(f"no dataset {name!r} in the datasets folder")
        return folder

    # -- changing -----------------------------------------------------------------------------------------------
    def delete(self, name: str) -> DatasetInfo:
        folder = self._folder(name)
        self._check_unused(folder, "deleted")
        info = describe(folder)
        trash = self.root / f".deleting-{uuid.uuid4().hex}"
        os.replace(folder, trash)  # gone from the listing at once, even if removing its files takes a while
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("dataset %r deleted (%d images)", name, info.images)
        return info

    def add(self, name: str, uploads: list[Upload], caption: str | None = None, replace: bool = False
            ) -> DatasetInfo:
        """Check and unpack `uploads` (one .zip, or images and captions) as dataset `name`. `caption` is written
        for every image that came without one."""
        if not is_valid_name(name):
            raise DatasetError(f"dataset name {name!r} must be 1-100 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit")
        if not uploads:
            raise DatasetError("no files: send a .zip, or images with their .txt captions")
        target = self.root / name
        if (target.exists() or target.is_symlink()) and not replace:
            raise Conflict(f"dataset {name!r} already exists; delete it first or send replace=true")
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            zipped = len(uploads) == 1 and uploads[0].filename.lower().endswith(".zip")
            written = self._unzip(uploads[0], staging) if zipped else self._copy(uploads, staging)
            self._check_contents(staging, written, caption)
            self._publish(staging, target, replace)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        info = describe(target)
        logger.info("dataset %r stored: %d images (%s), %d bytes", name, info.images, info.layout, info.bytes)
        return info

    def _publish(self, staging: Path, target: Path, replace: bool) -> None:
        if target.exists() or target.is_symlink():
            if not replace:
                raise Conflict(f"dataset {target.name!r} already exists; delete it first or send replace=true")
            if target.is_symlink() or not target.is_dir():
                raise Conflict(f"{target.name!r} in the datasets folder is not a dataset folder; not replaced")
            self._check_unused(target, "replaced")
            old = self.root / f".deleting-{uuid.uuid4().hex}"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)

    def _check_unused(self, folder: Path, what: str) -> None:
        run = self.in_use(folder.resolve())
        if run is not None:
            raise Conflict(f"dataset {folder.name!r} is used by training run {run}; it cannot be {what} until "
                           "that run ends")

    # -- 1 and 2: names and limits ---------------------------------------------------------------------------------
    def _unzip(self, upload: Upload, staging: Path) -> list[PurePosixPath]:
        try:
            archive = zipfile.ZipFile(upload.stream)
        except (zipfile.BadZipFile, OSError) as error:
            raise DatasetError(f"{upload.filename} is not a readable zip file ({error})") from error
        with archive:
            members = [info for info in archive.infolist() if not info.is_dir() and not _clutter(info.filename)]
            for info in members:
                _check_member(info)
            self._check_count(len(members))
            declared = sum(info.file_size for info in members)
            if declared > self.max_bytes:
                raise PayloadTooLarge(f"{upload.filename} unpacks to {declared} bytes; the limit is {self.max_bytes}")
            names = _strip_common_folder([PurePosixPath(info.filename) for info in members])
            total = 0
            for info, name in zip(members, names, strict=True):
                with archive.open(info) as source:
                    total = self._write(source, staging, name, total, limit=info.file_size)
        return names

    def _copy(self, uploads: list[Upload], staging: Path) -> list[PurePosixPath]:
        uploads = [upload for upload in uploads if not _clutter(upload.filename)]
        self._check_count(len(uploads))
        names, total = [], 0
        for upload in uploads:
            name = PurePosixPath(upload.filename)
            if not upload.filename or len(name.parts) != 1 or not _plain_part(upload.filename):
                raise DatasetError(f"file name {upload.filename!r}: send plain file names (no folders); a zip "
                                   "keeps folders")
            if name.suffix.lower() == ".zip":
                raise DatasetError(f"{upload.filename}: send one zip file alone, or images and captions")
            total = self._write(upload.stream, staging, name, total)
            names.append(name)
        return names

    def _check_count(self, count: int) -> None:
        if count > self.max_files:
            raise PayloadTooLarge(f"{count} files; a dataset may hold at most {self.max_files}")
        if count == 0:
            raise DatasetError("the upload holds no files")

    def _write(self, source: BinaryIO, staging: Path, name: PurePosixPath, total: int, limit: int | None = None
               ) -> int:
        _check_kind(name)
        target = staging.joinpath(*name.parts)
        if not target.resolve().is_relative_to(staging.resolve()):
            raise DatasetError(f"{name}: points outside the dataset")  # unreachable after _check_member; kept
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        try:
            # O_EXCL: never through an existing file or link, and a name sent twice is noticed.
            with open(target, "xb") as sink:
                for block in iter(lambda: source.read(CHUNK), b""):
                    written += len(block)
                    if limit is not None and written > limit:
                        raise DatasetError(f"{name}: holds more bytes than the zip says; refused")
                    if total + written > self.max_bytes:
                        raise PayloadTooLarge(f"the dataset unpacks to more than {self.max_bytes} bytes")
                    sink.write(block)
        except FileExistsError as error:
            raise DatasetError(f"{name} appears twice in the upload") from error
        return total + written

    # -- 3: contents --------------------------------------------------------------------------------------------
    def _check_contents(self, folder: Path, names: list[PurePosixPath], caption: str | None) -> None:
        images = [name for name in names if name.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise DatasetError(f"the upload holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for name in images:
            self._check_image(folder, name)
        for name in names:
            if name.suffix.lower() == CAPTION_SUFFIX or name.name == METADATA_FILE:
                _read_text(folder, name)
        has_metadata = PurePosixPath(METADATA_FILE) in names
        if not has_metadata and any(len(name.parts) > 1 for name in images):
            raise DatasetError("images in subfolders are read only through a metadata.jsonl at the top "
                               "(file_name, text); put the images at the top or add one")
        if caption is not None and not has_metadata:
            _caption_the_rest(folder, images, caption)
        if has_metadata or any(name.suffix.lower() == CAPTION_SUFFIX for name in names):
            used = {example.image for example in find_captioned_images(folder)}
            unused = [str(name) for name in images if folder.joinpath(*name.parts).resolve() not in used]
            if unused:
                shown = ", ".join(unused[:5]) + (" ..." if len(unused) > 5 else "")
                raise DatasetError(f"{len(unused)} image(s) are in no caption row of {METADATA_FILE}: {shown}")

    def _check_image(self, folder: Path, name: PurePosixPath) -> None:
        path = folder.joinpath(*name.parts)
        try:
            with Image.open(path) as image:
                width, height = image.size
                if width * height > self.max_pixels:
                    raise PayloadTooLarge(f"{name} is {width}x{height}; images may have at most {self.max_pixels} "
                                          "pixels")
                image.load()  # decodes every pixel: a truncated or corrupt file fails here, not in training
        except PayloadTooLarge:
            raise
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as error:
            raise DatasetError(f"{name} is not an image this server can read ({error})") from error


# -- describing a folder ----------------------------------------------------------------------------------------
def describe(folder: Path) -> DatasetInfo:
    """What the training scripts would find in `folder`."""
    images = find_images(folder, "dataset")
    if (folder / METADATA_FILE).is_file():
        layout = METADATA_FILE
    elif any(path.suffix == CAPTION_SUFFIX for path in folder.iterdir()):
        layout = "captions"
    else:
        layout = "images"
    captioned = 0
    if layout != "images":
        try:
            examples = find_captioned_images(folder)
            captioned = len(examples)
            images = sorted({example.image for example in examples} | set(images))
        except DatasetError:
            captioned = sum(image.with_suffix(CAPTION_SUFFIX).is_file() for image in images)
    size = sum(entry.stat(follow_symlinks=False).st_size for entry in _walk(folder))
    return DatasetInfo(name=folder.name, path=folder, layout=layout, images=len(images), captioned=captioned,
                       bytes=size, created_at=folder.stat().st_mtime)


def _walk(folder: Path) -> Iterator[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path))
            else:
                yield entry


# -- helpers ---------------------------------------------------------------------------------------------------
def _clutter(name: str) -> bool:
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return bool(parts) and (parts[0] == "__MACOSX" or parts[-1] in _CLUTTER_FILES or parts[-1].startswith("._"))


def _plain_part(part: str) -> bool:
    return part not in ("", ".", "..") and "\\" not in part and "\0" not in part and not re.match(r"^[A-Za-z]:", part)


def _check_member(info: zipfile.ZipInfo) -> None:
    """A regular file with a plain relative name, or refused with the name."""
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DatasetError(f"{name}: is a symbolic link; links are refused")
    if mode and stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        raise DatasetError(f"{name}: is not a regular file; refused")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise DatasetError(f"{name}: absolute names are refused")
    if not all(_plain_part(part) for part in name.split("/")):
        raise DatasetError(f"{name}: names with '..', backslashes or empty parts are refused")


def _check_kind(name: PurePosixPath) -> None:
    suffix = name.suffix.lower()
    if suffix in IMAGE_SUFFIXES or suffix == CAPTION_SUFFIX or name == PurePosixPath(METADATA_FILE):
        return
    raise DatasetError(f"{name}: only images ({', '.join(IMAGE_SUFFIXES)}), {CAPTION_SUFFIX} captions and a top-level "
                       f"{METADATA_FILE} may be uploaded")


def _strip_common_folder(names: list[PurePosixPath]) -> list[PurePosixPath]:
    """A zip of a folder holds `shapes/a.png, shapes/a.txt, ...`: the dataset is what is inside `shapes/`."""
    firsts = {name.parts[0] for name in names}
    if len(firsts) == 1 and all(len(name.parts) > 1 for name in names):
        return [PurePosixPath(*name.parts[1:]) for name in names]
    return names


def _read_text(folder: Path, name: PurePosixPath) -> str:
    try:
        text = folder.joinpath(*name.parts).read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{name} is not UTF-8 text (byte {error.start})") from error
    if name.name == METADATA_FILE:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as error:
                    raise DatasetError(f"{name} line {number}: not JSON ({error.msg})") from error
    return text


def _caption_the_rest(folder: Path, images: Iterable[PurePosixPath], caption: str) -> None:
    caption = caption.strip()
    if not caption:
        raise DatasetError("caption must not be blank")
    for name in images:
        caption_file = folder.joinpath(*name.with_suffix(CAPTION_SUFFIX).parts)
        if not caption_file.exists():
            caption_file.write_text(caption + "\n", encoding="utf-8")


def staging_leftovers(root: Path, older_than_s: float = 3600) -> list[Path]:
    """Staging and trash folders an interrupted upload or delete left behind (removed at server start)."""
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than_s
    return [path for path in root.iterdir() if path.name.startswith((STAGING_PREFIX, ".deleting-"))
            and path.stat().st_mtime < cutoff]
