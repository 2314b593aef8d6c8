"""Factories for the training tests: small datasets of coloured shapes, drawn in the test, and option presets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 190, 40), "blue": (30, 40, 220), "yellow": (235, 215, 20)}
SHAPES = ("square", "circle")
# LoRA on the UNet's first and last convolutions as well as attention: the random-weight demo UNet can then
# visibly fit a few dozen images in a few dozen steps, which attention-only LoRA cannot at this size.
FAST_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv_in", "conv_out"]


def shape_image(colour: str, shape: str, size: tuple[int, int] = (80, 64)) -> Image.Image:
    image = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(image)
    box = (size[0] // 5, size[1] // 8, size[0] * 4 // 5, size[1] * 7 // 8)
    (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLOURS[colour])
    return image


def shapes_dataset(folder: Path, layout: str = "metadata") -> Path:
    """Eight captioned images ('a red square', ...) as metadata.jsonl, .txt captions or a CSV; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            file_name = f"{colour}-{shape}.png"
            shape_image(colour, shape).save(folder / file_name)
            rows.append({"file_name": file_name, "text": f"a {colour} {shape}"})
    if layout == "metadata":
        (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
        return folder
    if layout == "captions":
        for row in rows:
            (folder / row["file_name"]).with_suffix(".txt").write_text(row["text"] + "\n", encoding="utf-8")
        return folder
    if layout == "csv":
        with (folder / "captions.csv").open("w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
        return folder / "captions.csv"
    raise ValueError(layout)


def instance_images(folder: Path, count: int = 3) -> Path:
    """A 'subject' for DreamBooth: the same red circle, slightly shifted."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (72, 72), (250, 250, 250))
        offset = 4 * index
        ImageDraw.Draw(image).ellipse((12 + offset, 12, 56 + offset, 56), fill=COLOURS["red"])
        image.save(folder / f"subject-{index}.png")
    return folder


def fast_options(**overrides: object) -> dict[str, object]:
    """Options for a few seconds of CPU training on the demo model."""
    options: dict[str, object] = {
        "base": "demo",
        "resolution": 64,
        "train_batch_size": 4,
        "learning_rate": 1e-2,
        "unet_target_modules": FAST_TARGETS,
        "seed": 7,
        "logging_steps": 1,
        "checkpointing_steps": 1000,
        "validation_inference_steps": 3,
    }
    options.update(overrides)
    return options


# Wide, tall and square pictures: an aspect-ratio bucket each at resolution 64 (80x48, 48x80, 64x64).
MIXED_SIZES = {"wide": (128, 64), "tall": (64, 128), "square": (96, 96)}


def mixed_shapes_dataset(folder: Path, per_shape: int = 3) -> Path:
    """Captioned pictures of three shapes of frame, each with a red mark at both ends of its long side (a square
    crop of a wide or tall picture would cut both away); .txt captions."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    for frame, (width, height) in MIXED_SIZES.items():
        for index in range(per_shape):
            colour = colours[index % len(colours)]
            image = Image.new("RGB", (width, height), (250, 250, 250))
            draw = ImageDraw.Draw(image)
            draw.ellipse((width // 4, height // 4, width * 3 // 4, height * 3 // 4), fill=COLOURS[colour])
            mark = max(width, height) // 8
            if width >= height:
                draw.rectangle((0, 0, mark, height), fill=(255, 0, 0))
                draw.rectangle((width - mark, 0, width, height), fill=(255, 0, 0))
            else:
                draw.rectangle((0, 0, width, mark), fill=(255, 0, 0))
                draw.rectangle((0, height - mark, width, height), fill=(255, 0, 0))
            name = f"{frame}-{index}"
            image.save(folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(f"a {colour} circle, {frame}\n", encoding="utf-8")
    return folder
