"""Pictures of a run for its folder, drawn with PIL alone: the loss curve (`loss.png`) and the validation images
side by side (`validation_grid.png`), so a run can be judged by opening two files.

The loss plot shows every step's loss (light) and a moving average (dark) against the step; the grid has one row
per validation round (the newest `MAX_GRID_ROWS`), one column per prompt and image, each row labelled with its step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

LOSS_PLOT = "loss.png"
VALIDATION_GRID = "validation_grid.png"
MAX_GRID_ROWS = 8
THUMBNAIL = 128
_WIDTH, _HEIGHT, _MARGIN = 720, 360, 56
_LIGHT, _DARK, _AXES, _BACKGROUND = (165, 185, 235), (40, 75, 200), (60, 60, 60), (255, 255, 255)


def save_loss_plot(points: Sequence[tuple[int, float]], path: Path) -> Path | None:
    """Loss against step as a PNG; nothing is written for fewer than two finite points."""
    points = [(step, loss) for step, loss in points if math.isfinite(loss)]
    if len(points) < 2:
        return None
    image = Image.new("RGB", (_WIDTH, _HEIGHT), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    steps = [step for step, _ in points]
    losses = [loss for _, loss in points]
    first, last = min(steps), max(steps)
    low, high = min(losses), max(losses)
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    left, top, right, bottom = _MARGIN, 24, _WIDTH - 16, _HEIGHT - 36

    def place(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - first) / max(last - first, 1) * (right - left)
        y = bottom - (loss - low) / (high - low) * (bottom - top)
        return x, y

    draw.rectangle((left, top, right, bottom), outline=_AXES)
    for fraction in (0.0, 0.5, 1.0):
        value = low + fraction * (high - low)
        y = bottom - fraction * (bottom - top)
        draw.line((left - 4, y, left, y), fill=_AXES)
        draw.text((4, y - 6), f"{value:.4g}", fill=_AXES, font=font)
    for step in (first, (first + last) // 2, last):
        x = place(step, low)[0]
        draw.line((x, bottom, x, bottom + 4), fill=_AXES)
        draw.text((x - 10, bottom + 8), str(step), fill=_AXES, font=font)
    draw.text((left, 6), "loss", fill=_AXES, font=font)
    draw.text((right - 30, _HEIGHT - 16), "step", fill=_AXES, font=font)
    draw.line([place(step, loss) for step, loss in points], fill=_LIGHT, width=1)
    draw.line([place(step, loss) for step, loss in zip(steps, moving_average(losses), strict=True)], fill=_DARK,
              width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def moving_average(values: Sequence[float], window: int | None = None) -> list[float]:
    """Trailing mean over `window` values (default: a twentieth of the run, at least 1)."""
    window = window or max(1, len(values) // 20)
    averaged, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averaged.append(total / min(index + 1, window))
    return averaged


def save_validation_grid(rounds: Sequence[tuple[int, Sequence[Path]]], path: Path) -> Path | None:
    """One row per (step, image files) round, newest last; nothing is written without images."""
    rounds = [(step, files) for step, files in rounds if files][-MAX_GRID_ROWS:]
    if not rounds:
        return None
    columns = max(len(files) for _, files in rounds)
    label_width = 72
    cell = THUMBNAIL + 4
    grid = Image.new("RGB", (label_width + columns * cell, len(rounds) * cell), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for row, (step, files) in enumerate(rounds):
        y = row * cell
        draw.text((6, y + THUMBNAIL // 2 - 6), f"step {step}", fill=_AXES, font=font)
        for column, file in enumerate(files):
            with Image.open(file) as opened:
                thumbnail = opened.convert("RGB")
            thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
            grid.paste(thumbnail, (label_width + column * cell + 2, y + 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
