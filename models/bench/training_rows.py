"""Training speed and memory: the LoRA script run for a few steps with and without latent caching and gradient
checkpointing, each run its own process (peak resident memory is that process's, from wait4)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from models.bench.processes import ROOT, _child_env
from models.bench.rows import Context

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
VARIANTS = {
    "plain": [],
    "latent caching": ["--cache-latents"],
    "gradient checkpointing": ["--gradient-checkpointing"],
    "both": ["--cache-latents", "--gradient-checkpointing"],
}


@dataclass
class TrainingResult:
    model: str
    variant: str
    resolution: int
    batch: int
    steps: int
    steps_per_s: float  # median over the logged steps after the first
    wall_s: float  # process start to exit, latent caching and model loading included
    peak_rss_mb: float
    returncode: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def shapes_dataset(folder: Path) -> Path:
    """Eight captioned pictures of coloured shapes, drawn here (metadata.jsonl + PNGs)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in ("square", "circle"):
            image = Image.new("RGB", (160, 128), (250, 250, 250))
            box = (32, 16, 128, 112)
            (ImageDraw.Draw(image).rectangle if shape == "square" else ImageDraw.Draw(image).ellipse)(box, fill=rgb)
            image.save(folder / f"{colour}-{shape}.png")
            rows.append({"file_name": f"{colour}-{shape}.png", "text": f"a {colour} {shape}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return folder


def training(ctx: Context, models: list[str], steps: int, resolution: int, batch: int) -> list[TrainingResult]:
    dataset = shapes_dataset(ctx.config.work / "shapes")
    results = []
    for model in models:
        for variant, flags in VARIANTS.items():
            results.append(_run(ctx, model, variant, flags, dataset, steps, resolution, batch))
    return results


def _run(ctx: Context, model: str, variant: str, flags: list[str], dataset: Path, steps: int, resolution: int,
         batch: int) -> TrainingResult:
    output = ctx.config.work / "training" / f"{model}-{variant.replace(' ', '-')}"
    command = [sys.executable, "-m", "training.train_lora", "--base", model, "--dataset", str(dataset),
               "--output-dir", str(output), "--max-train-steps", str(steps), "--resolution", str(resolution),
               "--train-batch-size", str(batch), "--logging-steps", "1", "--checkpointing-steps", "100000",
               "--seed", "7", *flags]
    env = _child_env(ctx.server_env())
    log = ctx.logs / f"train-{model}-{variant.replace(' ', '-')}.log"
    started = time.perf_counter()
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr)
        assert process.stdout is not None
        lines = process.stdout.read().decode(errors="replace").splitlines()
        # wait4 rather than wait: it returns this child's own resource usage, peak resident memory included.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    speeds = [event["steps_per_s"] for event in _events(lines) if event.get("event") == "step"]
    return TrainingResult(model, variant, resolution, batch, steps,
                          statistics.median(speeds[1:] or speeds) if speeds else float("nan"), wall,
                          usage.ru_maxrss / 1024, process.returncode)


def _events(lines: list[str]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
