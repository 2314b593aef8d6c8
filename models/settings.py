"""Typed settings, read once from the environment (prefix SDSERVE_) or a .env file."""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PACKAGE_DIR = Path(__file__).resolve().parent
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDSERVE_", env_file=".env", extra="ignore")

    registry_path: Path = Field(PACKAGE_DIR / "registry" / "registry.yaml", description="The model registry YAML file.")
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
    batch_max_images: int = Field(
        8, ge=1, description="Micro-batching: images that compatible requests may share one pipeline call with; "
        "1 turns it off."
    )
    batch_window_ms: float = Field(
        20, ge=0, le=5000, description="Micro-batching: how long the worker waits for compatible requests to join."
    )
    max_loaded_models: int = Field(2, ge=1, description="Base pipelines kept in memory (least recently used go).")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="Unload least recently used bases when their weights exceed this total."
    )
    low_memory: bool = Field(False, description="CPU offload, attention slicing and VAE tiling.")
    backend: Literal["torch", "openvino"] = Field(
        "torch",
        description="How base models run: torch (diffusers as it is) or openvino (the UNet exported once to OpenVINO "
        "and cached under CACHE_DIR/openvino; CPU and float32 only; needs the openvino extra). A registry entry's "
        "`backend` overrides it.",
    )
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
    max_loras_per_request: int = Field(8, ge=1, description="LoRAs one generation request may name.")

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
        None, description="Folders POST /train may read data from and write to besides datasets_dir (always allowed: "
        "uploaded datasets live there); default: output_dir."
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
    # -- datasets uploaded through the API (POST /datasets/{name}) --
    dataset_max_bytes: int = Field(
        2**30, ge=1, description="Largest dataset an upload may unpack to, in bytes (all files together)."
    )
    dataset_max_files: int = Field(10_000, ge=1, description="Most files one uploaded dataset may hold.")
    dataset_max_image_pixels: int = Field(
        64 * 2**20, ge=1, description="Largest image (width x height) an uploaded dataset may hold."
    )

    @field_validator("max_width", "max_height")
    @classmethod
    def _multiple_of_eight(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8, got {value}")
        return value

    # -- exposure: keys, hosts, origins, bounds (README "Security") --
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys that may use the API (a JSON list or comma-separated). When any key (or admin key) is set, "
        "every route but /health, the page and the docs needs `Authorization: Bearer KEY`, `X-API-Key: KEY` or "
        "HTTP basic auth whose password (or user:password) is a key.",
    )
    api_keys_file: Path | None = Field(None, description="A file of API keys, one per line (# comments), added to "
                                       "api_keys.")
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Keys that may also change the server: the registry, LoRAs and ControlNets loaded ahead, "
        "training, other clients' jobs.",
    )
    admin_keys_file: Path | None = Field(None, description="A file of admin keys, one per line, added to admin_keys.")
    allowed_hosts: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="Host names the server answers to (`*.example.com` patterns, `*` for any). Default: IP "
        "addresses and names without a dot (localhost, a container name), which refuses DNS rebinding.",
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins (scheme://host[:port]) of other web pages that may call the API from a browser: CORS "
        "answers them and their state-changing requests are accepted. Default: none, same-origin only.",
    )
    host: str | None = Field(
        None, validation_alias=AliasChoices("host", "SDSERVE_HOST", "HOST"),
        description="The address the server listens on, as run_api.sh and the Docker image pass it (HOST); used "
        "for the start-up warning about an open server without keys.",
    )
    max_body_bytes: int = Field(32 * 2**20, ge=1024, description="Largest request body; a bigger one is a 413.")
    max_input_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Decoded pixels of all input images of one request together."
    )
    max_input_images: int = Field(4, ge=1, description="Images one list of a request may hold (A1111 init_images).")

    @field_validator("api_keys", "admin_keys", "allowed_hosts", "allowed_origins", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _plain_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            text = key.get_secret_value()
            if not text or any(character.isspace() or ord(character) < 32 for character in text):
                raise ValueError("a key must be non-empty and hold no spaces or control characters")
        return keys

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"an origin is scheme://host[:port] without a path, got {origin!r}")
        return [origin.lower() for origin in origins]

    @model_validator(mode="after")
    def _keys_from_files(self) -> Settings:
        for keys, file in ((self.api_keys, self.api_keys_file), (self.admin_keys, self.admin_keys_file)):
            if file is None:
                continue
            try:
                lines = Path(file).read_text(encoding="utf-8").splitlines()
            except OSError as error:
                raise ValueError(f"cannot read the key file {file}: {error.strerror}") from error
            keys.extend(self._plain_keys([SecretStr(line.strip()) for line in lines
                                          if line.strip() and not line.lstrip().startswith("#")]))
        return self

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'sdserve.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    return Settings()
