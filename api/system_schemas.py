"""Response models of GET /stats, in the shape seed 003 answered (GPUtil's field names for GPUs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class CpuRam(BaseModel):
    total: int = Field(description="Physical memory, bytes.")
    available: int = Field(description="Memory that can be given to processes without swapping, bytes.")
    percent: float = Field(description="Percent of memory in use.")
    used: int = Field(description="Bytes in use.")
    free: int = Field(description="Bytes not used at all (less than available: caches count as used).")


class GpuInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: int = Field(description="CUDA device index, as torch numbers it (after CUDA_VISIBLE_DEVICES).")
    name: str = Field(description="The device's name.")
    load: float | None = Field(description="Fraction of time a kernel ran (0..1); null without nvidia-ml-py.")
    memoryTotal: float = Field(description="MiB.")  # noqa: N815 - seed 003's field names
    memoryUsed: float = Field(description="MiB.")  # noqa: N815
    memoryFree: float = Field(description="MiB.")  # noqa: N815


class Stats(BaseModel):
    cpu_ram: CpuRam
    gpu: list[GpuInfo] = Field(description="One entry per CUDA device; empty on a machine without one.")
