"""Peak memory of a generation: the device's (CUDA) or the process's resident peak (CPU, MPS). Worker thread."""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_mb() -> float:
    """CUDA: the most memory allocated since `reset_peak`. Elsewhere the process's resident peak since it started
    (the operating system keeps no per-job peak), which is what the model and the largest job needed."""
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / 2**20 if sys.platform == "darwin" else peak / 1024, 1)  # macOS: bytes, Linux: KiB
