"""Judging a picture of the `shapes` world: which background colour, which shape colour, which shape, where.

No model is involved: the background is the median colour of the picture's border, the shape is every pixel far
from it, its colour is their median, and its kind is the template (drawn by the data generator itself, fitted to
the shape's bounding box, taken once specks are filtered out) that overlaps it best. On the generator's own
pictures it is right every time (tests/test_shapes_model.py checks that first), so a failure on a generated
picture is the model's. Used by the tests and by `python -m training.shapes_eval`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from models.shapes import COLOURS, SHAPES
from training.shapes_data import CENTRES, draw_shape

BORDER = 2  # pixels of the edge that make the background
SHAPE_DISTANCE = 40.0  # RGB distance from the background above which a pixel belongs to the shape (orange and
# yellow, the closest pair of colours, are 82 apart)
SPECK_FILTER = 3  # median filter size (pixels) that clears specks before the bounding box is taken
MIN_SHAPE_SHARE = 0.01  # under this share of the picture, there is no shape
_TEMPLATE_SIZE = 256


@dataclass(frozen=True)
class Verdict:
    background: str
    colour: str | None  # None: no shape found
    shape: str | None
    position: str | None
    shape_share: float  # of the picture's pixels
    overlap: float  # intersection over union with the best template


def nearest_colour(rgb: np.ndarray, colours: dict[str, tuple[int, int, int]] | None = None) -> str:
    colours = colours or COLOURS
    return min(colours, key=lambda name: float(np.linalg.norm(rgb - np.asarray(colours[name], np.float64))))


def judge(image: Image.Image, colours: dict[str, tuple[int, int, int]] | None = None) -> Verdict:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[:BORDER].reshape(-1, 3), pixels[-BORDER:].reshape(-1, 3),
                             pixels[:, :BORDER].reshape(-1, 3), pixels[:, -BORDER:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest_colour(background_rgb, colours)
    mask = np.linalg.norm(pixels - background_rgb, axis=2) > SHAPE_DISTANCE
    share = float(mask.mean())
    if share < MIN_SHAPE_SHARE:
        return Verdict(background, None, None, None, share, 0.0)
    colour = nearest_colour(np.median(pixels[mask], axis=0), colours)
    rows, cols = np.nonzero(_without_specks(mask))
    if rows.size == 0:  # nothing but specks: no shape to fit
        return Verdict(background, colour, None, None, share, 0.0)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    overlaps = {shape: _iou(mask, _template(shape, box, (width, height))) for shape in SHAPES}
    shape = max(overlaps, key=lambda name: overlaps[name])
    centre = ((box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height)
    position = min(CENTRES, key=lambda name: (CENTRES[name][0] - centre[0]) ** 2 + (CENTRES[name][1] - centre[1]) ** 2)
    return Verdict(background, colour, shape, position, share, overlaps[shape])


def _without_specks(mask: np.ndarray) -> np.ndarray:
    """The mask less isolated pixels and thin lines (a decoder's stray corner pixel, a faint edge), which would
    otherwise stretch the shape's bounding box to the whole picture; the shape itself keeps its extent."""
    image = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MedianFilter(SPECK_FILTER))
    return np.asarray(image) > 127


def _template(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The generator's drawing of `shape`, stretched to fill `box`, as a boolean mask of a picture of `size`."""
    canvas = Image.new("L", (_TEMPLATE_SIZE, _TEMPLATE_SIZE), 0)
    draw_shape(canvas, shape, (_TEMPLATE_SIZE / 2, _TEMPLATE_SIZE / 2), _TEMPLATE_SIZE * 0.4, 255)
    tight = canvas.crop(canvas.getbbox())
    left, top, right, bottom = box
    fitted = tight.resize((right - left, bottom - top), Image.Resampling.BOX)
    mask = Image.new("L", size, 0)
    mask.paste(fitted, (left, top))
    return np.asarray(mask, dtype=np.float64) > 127


def _iou(first: np.ndarray, second: np.ndarray) -> float:
    union = np.logical_or(first, second).sum()
    return float(np.logical_and(first, second).sum() / union) if union else 0.0
