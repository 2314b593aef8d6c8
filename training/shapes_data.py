"""A procedural captioned data set: one coloured shape on a coloured background, drawn from a seed.

Picture `index` of the set drawn with `seed` is always the same picture with the same caption, on any machine:
every choice comes from `random.Random(f"{GENERATOR_VERSION}:{seed}:{index}")` (seeded from the string through
sha512, which Python keeps stable across versions and platforms), and the drawing is integer geometry in PIL,
drawn four times larger and reduced (smooth edges without antialiasing support in ImageDraw).

Bump GENERATOR_VERSION whenever a change here would draw or caption any picture differently: the manifest of a
model trained on these pictures names the version it saw.

The words and colours come from `models.shapes` (the server and the tests need them too).

    python -m training.shapes_data datasets/shapes --count 200 --seed 1       # a folder for train_lora.py
    python -m training.shapes_data datasets/pink --count 24 --colours pink=245,130,190 --seed 2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from models.shapes import COLOURS, NATIVE_SIZE, POSITIONS, SHAPES, SIZES, caption
from training.data import drops_caption

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SUPERSAMPLE = 4
# Radius of the shape (half its width) as a share of the picture's width, before a +-8% jitter.
RADIUS = {"small": 0.19, "large": 0.36}
# Centres of small shapes as shares of the width and height; large shapes are always centred.
CENTRES = {"center": (0.5, 0.5), "top left": (0.28, 0.28), "top right": (0.72, 0.28),
           "bottom left": (0.28, 0.72), "bottom right": (0.72, 0.72)}
JITTER = 0.03  # centre jitter, share of the width
TRIANGLE_SCALE = 1.15  # a triangle's circumradius, so that it looks as big as a circle of the same size
STAR_INNER = 0.5  # inner radius of the five-pointed star, share of the outer one (thick points survive 4x averaging)
# How often a caption names each optional part. The grammar makes the short prompt mean one picture: a shape
# whose size is not named is large and centred ("large" and "in the center" are sometimes said anyway), a small
# one is always called small and usually placed; a background not named is any other colour.
NAME_LARGE, NAME_CENTRE_OF_LARGE, NAME_PLACE_OF_SMALL, NAME_BACKGROUND = 0.3, 0.2, 0.85, 0.9


@dataclass(frozen=True)
class ShapeSpec:
    """What one picture shows; `caption` names some or all of it."""

    shape: str
    colour: str
    background: str
    size: str
    position: str
    centre: tuple[float, float]  # shares of width and height
    radius: float  # share of the width
    caption: str


def sample_spec(seed: int, index: int, colours: dict[str, tuple[int, int, int]] | None = None,
                shapes: tuple[str, ...] = SHAPES) -> ShapeSpec:
    """The picture `index` of the set drawn with `seed` (colours default to the model's vocabulary)."""
    colours = colours or COLOURS
    rng = random.Random(f"{GENERATOR_VERSION}:{seed}:{index}")
    shape = rng.choice(shapes)
    colour = rng.choice(sorted(colours))
    background = rng.choice(sorted(name for name in COLOURS if name != colour))
    size = rng.choice(SIZES)
    position = rng.choice(POSITIONS) if size == "small" else "center"
    x, y = CENTRES[position]
    centre = (x + rng.uniform(-JITTER, JITTER), y + rng.uniform(-JITTER, JITTER))
    radius = RADIUS[size] * rng.uniform(0.92, 1.08)
    if size == "large":
        named_size = size if rng.random() < NAME_LARGE else None
        named_position = position if rng.random() < NAME_CENTRE_OF_LARGE else None
    else:
        named_size = size
        named_position = position if rng.random() < NAME_PLACE_OF_SMALL else None
    named_background = background if rng.random() < NAME_BACKGROUND else None
    text = caption(shape, colour, named_background, named_size, named_position)
    return ShapeSpec(shape, colour, background, size, position, centre, radius, text)


def shape_outline(shape: str, centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """The polygon of a shape (a circle is returned as its bounding box's two corners) in the given units."""
    cx, cy = centre
    if shape in ("circle", "square"):
        half = radius if shape == "circle" else radius * 0.86  # a square as heavy to the eye as the circle
        return [(cx - half, cy - half), (cx + half, cy + half)]
    if shape == "triangle":
        # Equilateral, pointing up, its centroid on the centre.
        radius *= TRIANGLE_SCALE
        return [(cx + radius * math.cos(math.radians(a)), cy - radius * math.sin(math.radians(a)))
                for a in (90, 210, 330)]
    if shape == "star":
        points = []
        for corner in range(10):
            r = radius if corner % 2 == 0 else radius * STAR_INNER
            angle = math.radians(90 + 36 * corner)
            points.append((cx + r * math.cos(angle), cy - r * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def draw_shape(image: Image.Image, shape: str, centre: tuple[float, float], radius: float,
               fill: tuple[int, int, int] | int) -> None:
    """Draw a shape in place; centre and radius in pixels of `image`."""
    outline = shape_outline(shape, centre, radius)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse(outline, fill=fill)
    elif shape == "square":
        draw.rectangle(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)


def render(spec: ShapeSpec, size: int = NATIVE_SIZE, colours: dict[str, tuple[int, int, int]] | None = None
           ) -> Image.Image:
    """The picture of `spec`, `size` pixels square."""
    colours = {**COLOURS, **(colours or {})}
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), colours[spec.background])
    centre = (spec.centre[0] * big, spec.centre[1] * big)
    draw_shape(image, spec.shape, centre, spec.radius * big, colours[spec.colour])
    return image.resize((size, size), Image.Resampling.BOX)


class ShapesDataset(Dataset):
    """`count` generated pictures as training items (pixels in [-1, 1] and the caption); drawn when asked."""

    def __init__(self, count: int, seed: int, resolution: int = NATIVE_SIZE, caption_dropout: float = 0.0):
        self.count = count
        self.seed = seed
        self.resolution = resolution
        self.caption_dropout = caption_dropout
        self.epoch = 0

    def __len__(self) -> int:
        return self.count

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, object]:
        spec = sample_spec(self.seed, index)
        pixels = np.asarray(render(spec, self.resolution), dtype=np.float32)
        dropped = drops_caption(self.seed, self.epoch, index, self.caption_dropout)
        return {
            "prompt": "" if dropped else spec.caption,
            "prior": False,
            "pixel_values": torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0,
            # SDXL's size conditioning (unused by SD 1.x bases like this one): the whole picture, uncropped.
            "time_ids": torch.tensor([self.resolution, self.resolution, 0, 0, self.resolution, self.resolution],
                                     dtype=torch.float32),
        }

    def cache_latents(self, encode: object, batch_size: int = 8) -> None:
        raise ValueError("generated pictures are drawn on the fly; cache_latents does not apply to them")


def write_folder(folder: Path, count: int, seed: int, colours: dict[str, tuple[int, int, int]] | None = None,
                 resolution: int = NATIVE_SIZE) -> Path:
    """`count` pictures as PNG files with a metadata.jsonl of captions: a data set train_lora.py reads."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        spec = sample_spec(seed, index, colours)
        name = f"{index:05d}.png"
        render(spec, resolution, colours).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": spec.caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _colour(text: str) -> tuple[str, tuple[int, int, int]]:
    name, _, rgb = text.partition("=")
    try:
        red, green, blue = (int(part) for part in rgb.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=R,G,B (e.g. pink=245,130,190), got {text!r}") from None
    return name.strip(), (red, green, blue)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write generated shape pictures and their captions to a folder.")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=NATIVE_SIZE)
    parser.add_argument("--colours", type=_colour, nargs="*", default=None,
                        help="draw shapes only in these colours (NAME=R,G,B), e.g. a colour the model does not know")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    colours = dict(args.colours) if args.colours else None
    write_folder(args.folder, args.count, args.seed, colours, args.resolution)
    logger.info("wrote %d pictures and metadata.jsonl to %s (generator version %d, seed %d)", args.count,
                args.folder, GENERATOR_VERSION, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
