"""Host and accelerator usage for GET /stats, in the shape seed 003 served.

RAM comes from psutil, in bytes. GPUs come from torch.cuda, which reads NVML when `nvidia-ml-py` is installed
(load and memory, without creating a CUDA context) and otherwise the CUDA runtime (memory only; load is None).
GPU memory is in MiB and load a fraction 0..1, as GPUtil reported them in that seed. No GPU: an empty list.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import psutil
import torch

logger = logging.getLogger(__name__)

MIB = 2**20


@dataclass(frozen=True)
class RamStats:
    total: int
    available: int
    percent: float
    used: int
    free: int


@dataclass(frozen=True)
class GpuStats:
    id: int
    name: str
    load: float | None
    memoryTotal: float  # noqa: N815 - seed 003's field names
    memoryUsed: float  # noqa: N815
    memoryFree: float  # noqa: N815


def ram_stats() -> RamStats:
    memory = psutil.virtual_memory()
    return RamStats(
        total=memory.total, available=memory.available, percent=memory.percent, used=memory.used, free=memory.free
    )


def gpu_stats() -> list[GpuStats]:
    """One entry per visible CUDA device (torch's numbering); an empty list on a machine without one."""
    if not torch.cuda.is_available():
        return []
    return [_one_gpu(index) for index in range(torch.cuda.device_count())]


def system_stats() -> dict[str, object]:
    return {"cpu_ram": asdict(ram_stats()), "gpu": [asdict(gpu) for gpu in gpu_stats()]}


def _one_gpu(index: int) -> GpuStats:
    properties = torch.cuda.get_device_properties(index)
    total = properties.total_memory
    try:
        # NVML (through torch, which maps CUDA_VISIBLE_DEVICES) reads without creating a CUDA context.
        used = torch.cuda.device_memory_used(index)
        load: float | None = torch.cuda.utilization(index) / 100
    except Exception as error:  # noqa: BLE001 - nvidia-ml-py missing, or any NVMLError: fall back, never fail
        logger.debug("NVML unavailable for GPU %d (%s); reading memory through the CUDA runtime", index, error)
        free, total = torch.cuda.mem_get_info(index)
        used, load = total - free, None
    return GpuStats(
        id=index,
        name=properties.name,
        load=load,
        memoryTotal=round(total / MIB, 1),
        memoryUsed=round(used / MIB, 1),
        memoryFree=round(max(total - used, 0) / MIB, 1),
    )
