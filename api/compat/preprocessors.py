"""ControlNet preprocessors that need nothing beyond numpy and PIL: what the A1111 ControlNet extension's
`module` names run on the input image before it reaches the ControlNet.

- `none`: the image as it is (already a control image: edges, depth, pose, ...).
- `canny`: Canny edges (Gaussian blur, Sobel gradients, thinning to one pixel, two thresholds with hysteresis),
  white lines on black, with `threshold_a` / `threshold_b` as the low and high thresholds (0-255), as the
  extension's canny takes them.
- `invert`: black lines on white turned into white lines on black (the extension's "invert").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from models.errors import InvalidRequest

Preprocessor = Callable[[Image.Image, float, float], Image.Image]


def _none(image: Image.Image, threshold_a: float, threshold_b: float) -> Image.Image:
    return image.convert("RGB")


def _invert(image: Image.Image, threshold_a: float, threshold_b: float) -> Image.Image:
    return ImageOps.invert(image.convert("RGB"))


def canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges as an RGB image: white (255) on edges, black elsewhere."""
    gray = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(1.4)), dtype=np.float64)
    # 1. Gradients (Sobel), their size and direction.
    padded = np.pad(gray, 1, mode="edge")
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[1:-1, :-2]
                                                                       + padded[2:, :-2])
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[:-2, 1:-1]
                                                                       + padded[:-2, 2:])
    magnitude = np.abs(gx) + np.abs(gy)  # the L1 size OpenCV's Canny uses, so the extension's thresholds mean the same
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180) % 180
    # 2. Thin to one pixel: keep a pixel only where it is the largest along its gradient direction.
    m = np.pad(magnitude, 1)
    neighbours = {
        0: (m[1:-1, 2:], m[1:-1, :-2]),  # horizontal gradient: compare left and right
        45: (m[2:, 2:], m[:-2, :-2]),
        90: (m[2:, 1:-1], m[:-2, 1:-1]),
        135: (m[2:, :-2], m[:-2, 2:]),
    }
    direction = (np.round(angle / 45) % 4) * 45
    thin = np.zeros_like(magnitude, dtype=bool)
    for degrees, (a, b) in neighbours.items():
        here = direction == degrees
        thin |= here & (magnitude > a) & (magnitude >= b)  # a tie keeps one of the two
    magnitude = np.where(thin, magnitude, 0)
    # 3. Two thresholds: strong edges stay, weak ones only where they touch a strong edge (hysteresis).
    strong = magnitude >= high
    weak = magnitude >= low
    edges = strong.copy()
    while True:
        grown = np.pad(edges, 1)
        touching = np.zeros_like(edges)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                touching |= grown[dy:dy + edges.shape[0], dx:dx + edges.shape[1]]
        spread = weak & touching & ~edges
        if not spread.any():
            break
        edges |= spread
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8), "L").convert("RGB")


def _canny(image: Image.Image, threshold_a: float, threshold_b: float) -> Image.Image:
    return canny(image, low=threshold_a, high=threshold_b)


PREPROCESSORS: dict[str, Preprocessor] = {"none": _none, "canny": _canny, "invert": _invert}
# The extension's defaults for threshold_a / threshold_b when a client sends none (or -1).
DEFAULT_THRESHOLDS: dict[str, tuple[float, float]] = {"canny": (100, 200)}


def preprocess(module: str, image: Image.Image, threshold_a: float | None, threshold_b: float | None) -> Image.Image:
    name = module.strip().lower() or "none"
    if name not in PREPROCESSORS:
        raise InvalidRequest(f"unknown ControlNet module {module!r}; modules here: {', '.join(PREPROCESSORS)} "
                             "(send an already processed control image with module none)")
    default_a, default_b = DEFAULT_THRESHOLDS.get(name, (64, 64))
    a = default_a if threshold_a is None or threshold_a < 0 else threshold_a
    b = default_b if threshold_b is None or threshold_b < 0 else threshold_b
    return PREPROCESSORS[name](image, a, b)
