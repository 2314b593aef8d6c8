"""How often a `shapes` model draws what it is asked: the figures of the README's "The default model" table.

Prompts come from the data generator with a held-out seed (never the training data's), each drawn with its own
noise seed; training/shapes_judge.py reads every picture. Two sets: `a COLOUR SHAPE on a COLOUR background`
(background, shape colour, shape kind) and `a small COLOUR SHAPE in the PLACE on a COLOUR background` (place).

    python -m training.shapes_eval                                       # the committed model, the README's figures
    python -m training.shapes_eval --weights outputs/shapes-v3/model.safetensors --guidance 3 7
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from models import packed, shapes
from training.shapes_data import POSITIONS, sample_spec
from training.shapes_judge import judge

HELD_OUT_SEED = 20261126  # not the training data's seed (0), nor the tests' (20261125)


@dataclass
class Tally:
    hits: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, right: bool) -> None:
        self.hits[name] = self.hits.get(name, 0) + right
        self.counts[name] = self.counts.get(name, 0) + 1

    def share(self, name: str) -> float:
        return self.hits[name] / self.counts[name]


# What a prompt asks, by column: (the verdict's field, the value asked).
Asked = dict[str, tuple[str, str]]


def plain_prompts(count: int) -> Iterator[tuple[int, str, Asked]]:
    """(seed, prompt, what it asks) for `a COLOUR SHAPE on a COLOUR background` (a large, centred shape)."""
    for index in range(count):
        spec = sample_spec(HELD_OUT_SEED, index)
        asked = {"background": ("background", spec.background), "colour": ("colour", spec.colour),
                 "shape": ("shape", spec.shape)}
        yield HELD_OUT_SEED + index, shapes.caption(spec.shape, spec.colour, spec.background), asked


def placed_prompts(count: int) -> Iterator[tuple[int, str, Asked]]:
    """(seed, prompt, what it asks) for small shapes in each of the five places in turn."""
    for index in range(count):
        spec = sample_spec(HELD_OUT_SEED + 1, index)
        position = POSITIONS[index % len(POSITIONS)]
        prompt = shapes.caption(spec.shape, spec.colour, spec.background, "small", position)
        yield HELD_OUT_SEED + 10_000 + index, prompt, {"position": ("position", position),
                                                        "small shape": ("shape", spec.shape)}


def evaluate(pipeline: StableDiffusionPipeline, plain: int, placed: int, steps: int, guidance: float) -> Tally:
    tally = Tally()
    for seed, prompt, asked in [*plain_prompts(plain), *placed_prompts(placed)]:
        image = pipeline(prompt, num_inference_steps=steps, guidance_scale=guidance,
                         generator=torch.Generator().manual_seed(seed)).images[0]
        verdict = judge(image)
        right = {name: getattr(verdict, field) == value for name, (field, value) in asked.items()}
        for name, hit in right.items():
            tally.add(name, hit)
        if "shape" in asked:
            tally.add("all three", all(right.values()))
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=shapes.WEIGHTS_FILE, help="a packed model file")
    parser.add_argument("--prompts", type=int, default=160, help="prompts naming colours and shape")
    parser.add_argument("--placed", type=int, default=80, help="prompts naming the place of a small shape")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[7.0])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a 64 px model: one thread is fastest, and leaves the other cores alone
    pipeline = packed.unpack_pipeline(args.weights)
    pipeline.set_progress_bar_config(disable=True)
    out = sys.stdout  # a CLI's table, for the README
    out.write(f"{args.weights.name}: {args.prompts} + {args.placed} held-out prompts, {args.steps} steps\n\n")
    out.write("| guidance | background | shape colour | shape kind | all three | place of a small shape "
              "| kind of a small shape |\n")
    out.write("|---|---|---|---|---|---|---|\n")
    for guidance in args.guidance:
        tally = evaluate(pipeline, args.prompts, args.placed, args.steps, guidance)
        shares = [f"{tally.share(name):.0%}" if name in tally.counts else "-"
                  for name in ("background", "colour", "shape", "all three", "position", "small shape")]
        out.write(f"| {guidance:g} | " + " | ".join(shares) + " |\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
