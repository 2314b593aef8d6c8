"""Benchmark generation through the same worker the API uses; prints a table.

    python -m models.benchmark --model demo --size 256 512 --steps 20 --batch 1 4
    python -m models.benchmark --model sd15-random --size 512 --steps 20 --batch 1   # real SD 1.5 compute
"""

from __future__ import annotations

import argparse
import logging
import platform
import resource
import statistics
import sys
import time

import torch

from models.engine.device import select_device
from models.engine.pipelines import PipelineCache
from models.engine.worker import GenerationWorker, Job
from models.registry import Registry
from models.settings import Settings
from models.types import GenerationRequest, JobOptions


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _timed_request(worker: GenerationWorker, size: int, steps: int, batch: int, seed: int) -> float:
    request = GenerationRequest(task="text2img", prompt="a lighthouse at dusk", width=size, height=size,
                                steps=steps, num_images=batch, seed=seed)
    job = Job(request=request, options=JobOptions(save=False), seed_origin="client",
              model=worker.settings.default_model)
    started = time.perf_counter()
    worker.submit(job).future.result()
    return time.perf_counter() - started


def run(arguments: argparse.Namespace) -> list[dict[str, object]]:
    settings = Settings(default_model=arguments.model, preload_default_model=True, max_images=64, max_steps=1000)
    device = select_device(settings)
    worker = GenerationWorker(settings, PipelineCache(settings, Registry(settings.registry_path), device))
    worker.start()
    rows = []
    try:
        for size in arguments.size:
            for batch in arguments.batch:
                # warm-up: first-call allocations and kernel selection
                _timed_request(worker, size, min(2, arguments.steps), batch, 0)
                if device.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds = [
                    _timed_request(worker, size, arguments.steps, batch, 1 + repeat)
                    for repeat in range(arguments.repeats)
                ]
                median = statistics.median(seconds)
                rows.append({
                    "model": arguments.model, "size": f"{size}x{size}", "steps": arguments.steps, "batch": batch,
                    "s/request": f"{median:.3f}", "s/image": f"{median / batch:.3f}",
                    "steps/s": f"{arguments.steps / median:.2f}", "images/min": f"{60 * batch / median:.1f}",
                    "peak MB": f"{_peak_memory_mb(device.device):.0f}",
                })
    finally:
        worker.stop()
    return rows


def print_table(rows: list[dict[str, object]], device: str) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    out = sys.stdout
    out.write(f"device: {device}; torch {torch.__version__}; {platform.processor() or platform.machine()}\n")
    out.write("| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |\n")
    out.write("|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|\n")
    for row in rows:
        out.write("| " + " | ".join(str(row[c]).ljust(widths[c]) for c in columns) + " |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--size", type=int, nargs="+", default=[256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = run(arguments)
    print_table(rows, str(select_device(Settings()).describe()))


if __name__ == "__main__":
    main()
