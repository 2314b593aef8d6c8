"""Training speed and memory: the LoRA script run for a few steps with and without latent caching and gradient
checkpointing, each run its own process (peak resident memory is that process's, from wait4).

Beside them, when the bench is given the path of a copy of diffusers' official
`examples/text_to_image/train_text_to_image_lora.py` (`--diffusers-script`), that script on the same base folder,
data and settings (rank 4, same resolution, batch, steps, seed, learning rate, no checkpoints). The project does
not ship diffusers' script; its steps/s is read from its tqdm bar (the last rate shown). When no path is given, or
the script cannot run here (it imports torchvision and datasets), the row is reported as not run, with the reason.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from PIL import Image, ImageDraw

from models.bench.processes import ROOT, _child_env
from models.bench.rows import Context
from models.bench.stats import Skipped

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


DIFFUSERS_VARIANT = "diffusers train_text_to_image_lora.py"
LEARNING_RATE = "1e-4"
RANK = "4"
_TQDM_RATE = re.compile(r"(\d+(?:\.\d+)?)(it/s|s/it)")


def training(ctx: Context, models: list[str], steps: int, resolution: int, batch: int,
             diffusers_script: Path | None = None) -> tuple[list[TrainingResult], list[Skipped]]:
    """The project's variants for each model, and diffusers' script beside them (or why it was not run)."""
    dataset = shapes_dataset(ctx.config.work / "shapes")
    results, skipped = [], []
    for model in models:
        for variant, flags in VARIANTS.items():
            results.append(_run(ctx, model, variant, flags, dataset, steps, resolution, batch))
        outcome = _run_diffusers(ctx, model, diffusers_script, dataset, steps, resolution, batch)
        (skipped if isinstance(outcome, Skipped) else results).append(outcome)
    return results, skipped


def _run_diffusers(ctx: Context, model: str, script: Path | None, dataset: Path, steps: int, resolution: int,
                   batch: int) -> TrainingResult | Skipped:
    row = f"training {model}: {DIFFUSERS_VARIANT}"
    if script is None:
        return Skipped(row, "no --diffusers-script given: pass the path of a copy of diffusers' "
                            "examples/text_to_image/train_text_to_image_lora.py (needs torchvision and datasets)")
    if not script.is_file():
        return Skipped(row, f"--diffusers-script {script} is not a file")
    output = ctx.config.work / "training" / f"{model}-diffusers"
    command = [sys.executable, str(script), "--pretrained_model_name_or_path", str(ctx.folder(model)),
               "--train_data_dir", str(dataset), "--output_dir", str(output), "--max_train_steps", str(steps),
               "--resolution", str(resolution), "--train_batch_size", str(batch), "--rank", RANK,
               "--learning_rate", LEARNING_RATE, "--checkpointing_steps", "100000", "--seed", "7",
               "--dataloader_num_workers", "0", "--center_crop"]
    log = ctx.logs / f"train-{model}-diffusers.log"
    result = _measure(command, _child_env(ctx.server_env()), log)
    returncode, wall, peak_mb, _ = result
    text = log.read_text(encoding="utf-8", errors="replace")
    if returncode != 0:
        last = [line.strip() for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        return Skipped(row, f"{script} exited with {returncode}: {last[0][:300]} (log {log})")
    rates = [float(value) if unit == "it/s" else 1 / float(value) for value, unit in _TQDM_RATE.findall(text)
             if float(value) > 0]
    return TrainingResult(model, DIFFUSERS_VARIANT, resolution, batch, steps, rates[-1] if rates else float("nan"),
                          wall, peak_mb, returncode)


def _run(ctx: Context, model: str, variant: str, flags: list[str], dataset: Path, steps: int, resolution: int,
         batch: int) -> TrainingResult:
    output = ctx.config.work / "training" / f"{model}-{variant.replace(' ', '-')}"
    command = [sys.executable, "-m", "training.train_lora", "--base", model, "--dataset", str(dataset),
               "--output-dir", str(output), "--max-train-steps", str(steps), "--resolution", str(resolution),
               "--train-batch-size", str(batch), "--logging-steps", "1", "--checkpointing-steps", "100000",
               "--seed", "7",
               # Square center crops, as diffusers' script with --center_crop: the same pixels on both sides.
               "--no-aspect-ratio-buckets", *flags]
    log = ctx.logs / f"train-{model}-{variant.replace(' ', '-')}.log"
    returncode, wall, peak_mb, lines = _measure(command, _child_env(ctx.server_env()), log)
    speeds = [event["steps_per_s"] for event in _events(lines) if event.get("event") == "step"]
    return TrainingResult(model, variant, resolution, batch, steps,
                          statistics.median(speeds[1:] or speeds) if speeds else float("nan"), wall, peak_mb,
                          returncode)


def _measure(command: list[str], env: dict[str, str], log: Path) -> tuple[int, float, float, list[str]]:
    """Run one training process: its exit status, wall seconds, peak resident MB (sampled) and stdout lines
    (stderr to `log`)."""
    started = time.perf_counter()
    with log.open("wb") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr)
        assert process.stdout is not None
        peak = _PeakRss(process.pid)
        lines = process.stdout.read().decode(errors="replace").splitlines()
        process.wait()
        peak.stop()
    return process.returncode, time.perf_counter() - started, peak.mb, lines


class _PeakRss:
    """The largest resident memory of a process or any of its children (accelerate launch runs the trainer as
    one), sampled every 0.1 s. Not wait4's ru_maxrss: a forked child starts with its parent's high-water mark, so
    every training row after the fast-path row (whose parent holds SD 1.5) reported the parent's 4.4 GB."""

    def __init__(self, pid: int):
        self.mb = 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(pid,), daemon=True)
        self._thread.start()

    def _sample(self, pid: int) -> None:
        try:
            root = psutil.Process(pid)
            while True:  # a sample first: a process that ends within 0.1 s still gets one
                tree = [root, *root.children(recursive=True)]
                self.mb = max(self.mb, max(_rss(member) for member in tree) / 2**20)  # the trainer, not its launcher
                if self._done.wait(0.1):
                    return
        except psutil.NoSuchProcess:
            return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def _events(lines: list[str]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events
