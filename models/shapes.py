"""The `shapes` model's world: the words it knows, and how its one committed weights file becomes a pipeline.

The default model (`demo:shapes`) is a tiny text-to-image model trained by this project's own training code on
procedurally drawn pictures of one coloured shape on a coloured background (`training/shapes_data.py` draws them,
`training/train_text_to_image.py` trains it). Its weights are one small file in the repository,
`models/weights/shapes-v2.safetensors`, with `shapes-v2.manifest.json` beside it (sha256, the command and seed that
reproduce it). The vocabulary lives here, not in `training/`, because the server, the tests and the README need it
too and `models/` never imports `training/`.

Prompts it understands: "a|an [small|large] COLOUR SHAPE [in the center|in the top left|...] [on a|an COLOUR
background]", e.g. "a red circle on a blue background" (no size: large and centred). Anything else it never saw.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from diffusers import StableDiffusionPipeline

from models import packed
from models.errors import ModelUnavailable

# name -> RGB as drawn. Well apart from each other, so the colour of a picture can be told by the nearest name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
SIZES: tuple[str, ...] = ("small", "large")
# Small shapes sit in one of these places; large ones are always in the center.
POSITIONS: tuple[str, ...] = ("center", "top left", "top right", "bottom left", "bottom right")
# The other words of the caption grammar.
GRAMMAR_WORDS: tuple[str, ...] = (
    "a", "an", "in", "the", "on", "background", "top", "bottom", "left", "right", "center",
)
NATIVE_SIZE = 64  # pixels; trained at this size, and the server's default for this model

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "shapes-v2.safetensors"
MANIFEST_FILE = WEIGHTS_DIR / "shapes-v2.manifest.json"


def vocabulary() -> list[str]:
    """Every word the model was trained on, each one token of its tokenizer (other words split into letters)."""
    words = [*COLOURS, *SHAPES, *SIZES, *GRAMMAR_WORDS]
    return list(dict.fromkeys(words))


def position_phrase(position: str) -> str:
    return "in the center" if position == "center" else f"in the {position}"


def caption(shape: str, colour: str, background: str | None = None, size: str | None = None,
            position: str | None = None) -> str:
    """The caption grammar the model learnt: 'a|an [size] colour shape [position] [on a background background]'."""
    described = [*([size] if size else []), colour, shape]
    words = ["an" if described[0][0] in "aeiou" else "a", *described]
    if position:
        words.append(position_phrase(position))
    if background:
        words.append(f"on {'an' if background[0] in 'aeiou' else 'a'} {background} background")
    return " ".join(words)


def manifest() -> dict[str, Any]:
    try:
        return json.loads(MANIFEST_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"the shapes model's manifest {MANIFEST_FILE} cannot be read: {error}") from error


def cache_tag() -> str:
    """Part of the cache folder's name: a retrained weights file (a new sha256 in the manifest) builds anew."""
    return "-" + manifest()["sha256"][:12]


def build_shapes_pipeline() -> StableDiffusionPipeline:
    """The trained model from its committed file, checked against the manifest's sha256 first."""
    expected = manifest()["sha256"]
    try:
        digest = hashlib.sha256(WEIGHTS_FILE.read_bytes()).hexdigest()
    except OSError as error:
        raise ModelUnavailable(f"the shapes model's weights {WEIGHTS_FILE} cannot be read: {error}") from error
    if digest != expected:
        # A Git LFS pointer, a truncated checkout, or a retrained file copied without its manifest.
        raise ModelUnavailable(
            f"{WEIGHTS_FILE} has sha256 {digest}, but {MANIFEST_FILE.name} says {expected}: copy the weights file "
            "and its manifest from the same training run (README, 'How it is made')"
        )
    return packed.unpack_pipeline(WEIGHTS_FILE)
