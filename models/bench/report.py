"""The run's results as a Markdown table and a JSON file."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import diffusers
import psutil
import torch

from models.bench import profile as profiling
from models.bench.stats import Comparison, Skipped
from models.bench.training_rows import TrainingResult


def machine(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "torch_threads": torch.get_num_threads(), "device": device,
    }
    try:
        import openvino

        info["openvino"] = openvino.__version__.split("-")[0]
    except ImportError:
        info["openvino"] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _number(value: float) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _verdict(row: Comparison) -> str:
    speedup = row.speedup
    if speedup != speedup:
        return "-"
    if row.higher_is_better:
        return f"{speedup:.2f}x the throughput"
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def markdown(meta: dict[str, Any], rows: list[Comparison], skipped: list[Skipped],
             training: list[TrainingResult], profile: profiling.Profile | None = None) -> str:
    m = meta["machine"]
    lines = [
        "# sdserve benchmark", "",
        f"- command: `{meta['command']}`",
        f"- machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['ram_gib']} GiB RAM"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; device {m['device']}",
        f"- software: Python {m['python']}, torch {m['torch']} ({m['torch_threads']} threads), "
        f"diffusers {m['diffusers']}, openvino {m['openvino']}",
        f"- started {meta['started']}, took {meta['wall_s']:.0f} s; load average at start {meta['load_start']}, "
        f"at end {meta['load_end']} (other work on the machine slows both sides of a row alike, not equally)",
        "",
        "Side A is this project (or the option under test), side B the baseline; A/B is the ratio of medians.",
        "",
        "| row | model | setup | unit | side A | A median | A p95 | side B | B median | B p95 | A/B | A is | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.row} | {row.model} | {row.setup} | {row.unit} | {row.a.label} | {_number(row.a.median)} | "
            f"{_number(row.a.p95)} | {row.b.label} | {_number(row.b.median)} | {_number(row.b.p95)} | "
            f"{_number(row.ratio)} | {_verdict(row)} | {row.notes} |"
        )
    if training:
        lines += ["", "Training (training/train_lora.py, a few steps each; steps/s is the median after the first "
                      "step; peak RSS of the training process)", "",
                  "| model | variant | resolution | batch | steps | steps/s | wall s | peak RSS MB | exit |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for result in training:
            lines.append(f"| {result.model} | {result.variant} | {result.resolution} | {result.batch} | "
                         f"{result.steps} | {_number(result.steps_per_s)} | {result.wall_s:.1f} | "
                         f"{result.peak_rss_mb:.0f} | {result.returncode} |")
    if profile is not None:
        lines += profiling.markdown(profile)
    if skipped:
        lines += ["", "Not run:", ""] + [f"- {item.row}: {item.reason}" for item in skipped]
    return "\n".join(lines) + "\n"


def write(out: Path, meta: dict[str, Any], rows: list[Comparison], skipped: list[Skipped],
          training: list[TrainingResult], profile: profiling.Profile | None = None) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    table = out / "bench.md"
    table.write_text(markdown(meta, rows, skipped, training, profile), encoding="utf-8")
    data = out / "bench.json"
    data.write_text(json.dumps({
        **meta,
        "comparisons": [row.to_json() for row in rows],
        "training": [result.to_json() for result in training],
        "skipped": [item.__dict__ for item in skipped],
        "profile": profile.to_json() if profile is not None else None,
    }, indent=2, default=str), encoding="utf-8")
    return table, data
