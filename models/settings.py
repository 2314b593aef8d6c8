"""Typed settings, read once from the environment (prefix SDSERVE_) or a .env file."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDSERVE_", env_file=".env", extra="ignore")

    registry_path: Path = Field(PACKAGE_DIR / "registry.yaml", description="The model registry YAML file.")
    cache_dir: Path = Field(Path(".cache/sdserve"), description="Where builtin demo/preset models are built.")
    output_dir: Path = Field(Path("outputs"), description="Generated images and training runs.")
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: float16 on CUDA and MPS, float32 on CPU."
    )
    prefer_bf16: bool = Field(False, description="With dtype auto on CUDA, bfloat16 instead of float16.")
    default_model: str = Field("shapes", description="Model used when a request names none; loaded at start-up.")
    preload_default_model: bool = True
    allow_downloads: bool = Field(
        False, description="Let from_pretrained fetch missing weights from the Hugging Face Hub."
    )
    max_width: int = Field(2048, ge=64)
    max_height: int = Field(2048, ge=64)
    max_steps: int = Field(150, ge=1)
    max_images: int = Field(8, ge=1, description="Images per request.")
    queue_size: int = Field(16, ge=1, description="Requests waiting for the device; more get 429.")
    max_loaded_models: int = Field(2, ge=1, description="Base pipelines kept in memory (least recently used go).")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Unload least recently used bases when their weights exceed this total."
    )
    low_memory: bool = Field(False, description="CPU offload, attention slicing and VAE tiling.")
    attention: Literal["auto", "sdpa", "xformers"] = Field(
        "auto", description="auto: xformers when installed on CUDA, else PyTorch SDPA."
    )
    allow_pickle: bool = Field(
        False, description="Allow .bin/.ckpt/.pt weight files, which can run code when loaded."
    )
    lora_roots: Annotated[list[Path] | None, NoDecode] = Field(
        None,
        description="Folders LoRA files may be read from (a JSON list, or paths separated by the OS path separator). "
        "Default: the registry file's folder, output_dir (training runs included) and the Hugging Face cache.",
    )
    max_loras: int = Field(
        8, ge=1, description="LoRA adapters kept loaded per base model (least recently used are unloaded)."
    )

    @field_validator("lora_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part] or None
        return value
    max_controlnets: int = Field(
        2, ge=1, description="ControlNets kept loaded (least recently used are unloaded); they are shared by all bases."
    )
    log_level: str = Field(
        "INFO",
        validation_alias=AliasChoices("log_level", "SDSERVE_LOG_LEVEL", "LOG_LEVEL"),
        description="Level of sdserve's own log lines, each tagged with its request and job id "
        "(LOG_LEVEL, which run_api.sh also gives uvicorn, works too).",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level
    data_dir: Path = Field(Path("data"), description="Server state: the SQLite database of jobs and images.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL of the jobs/images database; default sqlite:///DATA_DIR/sdserve.db."
    )
    save_images: bool = Field(
        True, description="Save generated images as PNG (with their parameters) under OUTPUT_DIR/images."
    )
    result_cache_size: int = Field(
        32, ge=0, description="Results of deterministic requests (explicit seed) kept in memory; 0 disables."
    )
    preview_every: int = Field(
        5, ge=0, description="A small JPEG preview in every Nth progress event of a watched job; 0 disables."
    )
    # -- training runs started through the API (POST /train) --
    datasets_dir: Path = Field(Path("datasets"), description="Where relative dataset paths of POST /train point.")
    training_dirs: list[Path] | None = Field(
        None, description="Folders POST /train may read data from and write to; default: datasets_dir and output_dir."
    )
    training_max_running: int = Field(1, ge=1, description="Training runs at once (one per device); more wait.")
    training_accelerate_config: Path | None = Field(
        Path("accelerate_config.yaml"), description="accelerate config for API runs, used when the file exists."
    )
    training_launch_args: list[str] = Field(
        default_factory=list, description='Extra `accelerate launch` arguments, e.g. ["--num_processes", "2"].'
    )
    training_stop_timeout_s: float = Field(
        60.0, gt=0, description="How long a cancelled run may take to checkpoint before it is killed."
    )

    @field_validator("max_width", "max_height")
    @classmethod
    def _multiple_of_eight(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'sdserve.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
