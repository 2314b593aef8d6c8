"""Options of the training scripts: one pydantic model per script, read from flags, a YAML/TOML/JSON file or the API.

Every option is declared once, here, with its description and constraints. The command line is generated from
the model (`--max-train-steps 200` and diffusers' `--max_train_steps=200` both work), a config file gives the same
keys, flags override the file, and `POST /train` validates its `args` with the same models. Nothing here imports
torch, so the API can validate a request without loading any of it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from ruamel.yaml import YAML

from models.errors import SdserveError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
UNET_ATTENTION_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Set by the server for runs it starts; a client of POST /train may not choose them.
SERVER_OWNED_OPTIONS = ("output_dir", "run_id", "resume_from_checkpoint")


class OptionsError(ValueError):
    """A config file or flag that cannot be read; the message names the key or flag."""


class RunOptions(BaseModel):
    """What every training script shares: the base, data handling, optimisation, checkpoints, validation,
    registration."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = "lora"

    # -- base and output -----------------------------------------------------------------------------------
    base: str = Field(
        "demo", min_length=1,
        description="Registry name of the base model (see GET /models), or a diffusers folder / .safetensors file.",
    )
    output_dir: Path | None = Field(
        None, description="Where weights, checkpoints and validation images go; default outputs/training/<run id>."
    )
    run_id: str | None = Field(
        None, pattern=NAME_PATTERN, description="Identifier of this run, recorded as created_by; default: generated."
    )
    # -- data ---------------------------------------------------------------------------------------------
    resolution: int | None = Field(
        None, ge=64, le=4096, multiple_of=8,
        description="Square training size in pixels; images are resized (short side) and cropped. Default: the base's.",
    )
    crop: Literal["center", "random"] = Field("center", description="How the square is cut from the resized image.")
    random_flip: bool = Field(False, description="Flip images horizontally at random (half of the time).")
    cache_latents: bool = Field(
        False, description="Encode every image with the VAE once before training (faster steps; no random crop)."
    )
    dataloader_num_workers: int = Field(0, ge=0, le=64, description="Worker processes that load images.")
    # -- optimisation ---------------------------------------------------------------------------------------
    learning_rate: float = Field(
        1e-4, gt=0, le=1,
        description="Peak learning rate of the LoRA layers (of every trained weight in full training).",
    )
    text_encoder_learning_rate: float | None = Field(
        None, gt=0, le=1, description="Learning rate of the text encoder's trained weights; default: --learning-rate."
    )
    lr_scheduler: LrScheduler = Field("constant", description="Learning-rate schedule after warmup.")
    lr_warmup_steps: int = Field(0, ge=0, description="Steps of linear warmup from 0 to the learning rate.")
    lr_num_cycles: int = Field(1, ge=1, description="Restarts of cosine_with_restarts.")
    lr_power: float = Field(1.0, gt=0, description="Power of the polynomial schedule.")
    max_train_steps: int | None = Field(
        None, ge=1, description="Optimizer steps to run; overrides --num-train-epochs when given."
    )
    num_train_epochs: int = Field(10, ge=1, description="Passes over the data when --max-train-steps is not given.")
    train_batch_size: int = Field(1, ge=1, le=1024, description="Images per device per step.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024, description="Batches summed into one optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, slower.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None, description="Frozen weights and activations in this precision; default: the accelerate config's."
    )
    allow_tf32: bool = Field(False, description="Allow TF32 matmuls on Ampere and newer GPUs.")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_weight_decay: float = Field(1e-2, ge=0)
    adam_epsilon: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    snr_gamma: float | None = Field(
        None, gt=0, description="Min-SNR loss weighting with this gamma (5.0 is the paper's choice); off when unset."
    )
    noise_offset: float = Field(0.0, ge=0, le=1, description="Offset noise strength (0.05-0.1 helps very dark/bright).")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] | None = Field(
        None, description="Training target (the noise, v, or the clean latent); default: the base scheduler's."
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1,
        description="Seed for new weights (LoRA layers, a model from scratch), shuffling and noise; default: random.",
    )
    # -- checkpoints and progress -------------------------------------------------------------------------------
    checkpointing_steps: int = Field(500, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    checkpoints_total_limit: int | None = Field(None, ge=1, description="Keep only the newest N checkpoints.")
    resume_from_checkpoint: str | None = Field(
        None, description="'latest' (in --output-dir) or a checkpoint folder: continue exactly where it stopped."
    )
    logging_steps: int = Field(10, ge=1, description="Write a progress line (JSON) every N optimizer steps.")
    # -- validation ---------------------------------------------------------------------------------------------
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts rendered during training.")
    validation_steps: int = Field(100, ge=1, description="Render the validation prompts every N steps and at the end.")
    num_validation_images: int = Field(1, ge=1, le=16, description="Images per validation prompt.")
    validation_inference_steps: int = Field(25, ge=1, le=200, description="Denoising steps of validation images.")
    validation_guidance_scale: float = Field(7.0, ge=0, le=50, description="Guidance scale of validation images.")
    # -- registration ---------------------------------------------------------------------------------------
    register_as: str | None = Field(
        None, pattern=NAME_PATTERN, validation_alias=AliasChoices("register", "register_as"),
        description="Add the result to the model registry under this name when done.",
    )
    register_replace: bool = Field(False, description="With --register: overwrite an entry of the same name.")
    trigger_words: list[str] = Field(
        default_factory=list, description="Words that call up what was learnt; recorded in the weights and registry."
    )
    description: str | None = Field(None, max_length=2000, description="Free text stored in the registry entry.")

    @model_validator(mode="after")
    def _consistent(self) -> RunOptions:
        if self.cache_latents and self.crop == "random":
            raise ValueError("cache_latents encodes each image once, so it cannot be combined with crop=random")
        if self.resume_from_checkpoint == "latest" and self.output_dir is None:
            raise ValueError("resume_from_checkpoint=latest needs output_dir: the run folder to resume")
        return self

    @field_validator("validation_prompts", "trigger_words")
    @classmethod
    def _no_blank_entries(cls, values: list[str]) -> list[str]:
        if any(not value.strip() for value in values):
            raise ValueError("entries must not be blank")
        return values


class TrainingOptions(RunOptions):
    """What both LoRA scripts share: the options of every run and the LoRA shape."""

    # -- LoRA ---------------------------------------------------------------------------------------------
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank (dimension of the low-rank update).")
    lora_alpha: float | None = Field(
        None, gt=0, description="LoRA alpha; the update is scaled by alpha / rank. Default: equal to the rank."
    )
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    unet_target_modules: list[str] = Field(
        default_factory=lambda: list(UNET_ATTENTION_MODULES), min_length=1,
        description="UNet module names (or suffixes) that get LoRA layers.",
    )
    train_text_encoder: bool = Field(
        False, description="Also train LoRA layers on the text encoder (both of SDXL's text encoders)."
    )
    text_encoder_target_modules: list[str] = Field(
        default_factory=lambda: list(TEXT_ENCODER_ATTENTION_MODULES), min_length=1,
        description="Text encoder modules that get LoRA layers with --train-text-encoder.",
    )
    register_scale: float = Field(1.0, ge=-10, le=10, description="Default scale of the registered LoRA.")

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else float(self.rank)


class CaptionColumns(BaseModel):
    """How a captioned data set names its images and captions."""

    image_column: str = Field("file_name", min_length=1, description="Image path column of metadata.jsonl / CSV.")
    caption_column: str = Field("text", min_length=1, description="Caption column of metadata.jsonl / CSV.")
    caption_extension: str = Field(".txt", pattern=r"^\.[A-Za-z0-9]+$", description="Suffix of caption files.")


DATASET_DESCRIPTION = ("A folder with metadata.jsonl (file_name, text) or images with same-name .txt captions, "
                       "or a .csv file (file_name, text columns; paths relative to the CSV).")


class LoraOptions(CaptionColumns, TrainingOptions):
    """Text-to-image LoRA from captioned images."""

    kind: ClassVar[str] = "lora"

    dataset: Path = Field(description=DATASET_DESCRIPTION)


class TextToImageOptions(CaptionColumns, RunOptions):
    """Full text-to-image training: every weight of the UNet and the text encoder (and optionally the VAE decoder),
    starting from a base or, with --from-scratch, from new random weights of a named architecture."""

    kind: ClassVar[str] = "text_to_image"

    from_scratch: Literal["shapes-tiny"] | None = Field(
        None, description="Start from new random weights of this architecture (training/shapes_model.py) "
        "instead of from --base.",
    )
    dataset: Path | None = Field(None, description=DATASET_DESCRIPTION + " Or give --shapes-dataset.")
    shapes_dataset: int | None = Field(
        None, ge=1, le=100_000_000,
        description="Train on this many pictures drawn by training/shapes_data.py from --seed (instead of --dataset).",
    )
    caption_dropout: float = Field(
        0.1, ge=0, lt=1,
        description="Share of captions replaced by the empty prompt (classifier-free guidance needs it).",
    )
    train_text_encoder: bool = Field(True, description="Train the text encoder too.")
    train_vae_decoder: bool = Field(
        False, description="Train the VAE decoder too, to redraw the training images from their latents "
        "(the encoder stays as it is, so the latents the UNet learns do not move).",
    )
    vae_decoder_images: int = Field(
        8, ge=1, le=1024, description="Images of each batch the VAE decoder learns from (all would cost more than "
        "the UNet at small latent sizes).",
    )

    @model_validator(mode="after")
    def _one_start_and_one_dataset(self) -> TextToImageOptions:
        if self.from_scratch and "base" in self.model_fields_set:
            raise ValueError("give either from_scratch (new weights) or base (continue from a model), not both")
        if (self.dataset is None) == (self.shapes_dataset is None):
            raise ValueError("give exactly one of dataset (captioned images) and shapes_dataset (generated pictures)")
        if self.from_scratch and not self.train_vae_decoder:
            raise ValueError(f"{self.from_scratch} starts with an untrained VAE decoder; add train_vae_decoder")
        if self.shapes_dataset is not None and self.cache_latents:
            raise ValueError("shapes_dataset draws pictures on the fly, so cache_latents does not apply")
        return self


class DreamBoothOptions(TrainingOptions):
    """DreamBooth-LoRA: a few images of one subject, named by an instance prompt; optional prior preservation."""

    kind: ClassVar[str] = "dreambooth"

    instance_data_dir: Path = Field(description="Folder of images of the subject.")
    instance_prompt: str = Field(
        min_length=1, max_length=1000, description="Prompt naming the subject, e.g. 'a photo of sks dog'."
    )
    with_prior_preservation: bool = Field(
        False, description="Also train on class images so the model keeps its idea of the class."
    )
    class_prompt: str | None = Field(None, min_length=1, max_length=1000, description="E.g. 'a photo of a dog'.")
    class_data_dir: Path | None = Field(
        None, description="Folder of class images; the base renders the missing ones. Default: <output>/class_images."
    )
    num_class_images: int = Field(100, ge=1, le=10_000, description="Class images wanted; the base generates the rest.")
    class_generation_steps: int = Field(25, ge=1, le=200, description="Denoising steps per generated class image.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class images' loss.")

    @model_validator(mode="after")
    def _prior_needs_class_prompt(self) -> DreamBoothOptions:
        if self.with_prior_preservation and not self.class_prompt:
            raise ValueError("with_prior_preservation needs class_prompt (e.g. 'a photo of a dog')")
        return self


OPTIONS_BY_KIND: dict[str, type[TrainingOptions]] = {"lora": LoraOptions, "dreambooth": DreamBoothOptions}


# -- reading options ---------------------------------------------------------------------------------------------
def read_config_file(path: Path) -> dict[str, Any]:
    """Keys of a YAML, TOML or JSON file, with dashes turned into underscores."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise OptionsError(f"cannot read config file {path}: {error.strerror or error}") from error
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = YAML(typ="safe").load(text)
    except Exception as error:  # noqa: BLE001 - any parser error becomes one readable message
        raise OptionsError(f"config file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionsError(f"config file {path} must hold a mapping of option: value")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


OptionsT = TypeVar("OptionsT", bound=RunOptions)


def build_parser(options_class: type[RunOptions], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML, TOML or JSON file of options; flags override it.")
    for name, field in options_class.model_fields.items():
        spellings = _aliases(field) or [name]
        kind, choices = _flag_shape(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown_default = "" if default is None or field.is_required() else f" (default: {default})"
        help_text = (field.description or "") + shown_default
        keywords: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if kind == "flag":
            keywords["action"] = argparse.BooleanOptionalAction
        elif kind == "list":
            keywords["nargs"] = "*"
            keywords["metavar"] = spellings[0].upper().removesuffix("S")
        else:
            keywords["choices"] = choices
            keywords["metavar"] = "{" + ",".join(choices) + "}" if choices else spellings[0].upper()
        parser.add_argument(*[f"--{spelling.replace('_', '-')}" for spelling in spellings],
                            help=help_text.replace("%", "%%"), **keywords)
        # diffusers' scripts spell flags with underscores (--max_train_steps); accepted, not listed twice.
        underscored = [f"--{spelling}" for spelling in spellings if "_" in spelling]
        if underscored:
            parser.add_argument(*underscored, help=argparse.SUPPRESS, **keywords)
    return parser


def parse_options(
    options_class: type[OptionsT], argv: list[str] | None = None, check: Callable[[OptionsT], object] | None = None
) -> OptionsT:
    """Options from a config file (--config) overlaid with explicit flags, validated, then `check`ed (e.g. that
    the dataset exists); any problem exits with status 2 and a message."""
    parser = build_parser(options_class, options_class.__doc__ or "")
    namespace = vars(parser.parse_args(argv))
    config_path = namespace.pop("config", None)
    try:
        values = read_config_file(config_path) if config_path else {}
        values.update(namespace)
        options = options_class.model_validate(values)
        if check is not None:
            check(options)
        return options
    except OptionsError as error:
        parser.error(str(error))
    except ValidationError as error:
        parser.error("invalid options:\n  " + "\n  ".join(describe_errors(error)))
    except SdserveError as error:
        parser.error(str(error))
    raise AssertionError("unreachable")  # parser.error exits


def describe_errors(error: ValidationError, prefix: str = "") -> list[str]:
    """'max_train_steps: Input should be greater than or equal to 1 (got 0)' for each problem."""
    problems = []
    for item in error.errors():
        where = prefix + ".".join(str(part) for part in item["loc"]) or "options"
        message = re.sub(r"^Value error, ", "", item["msg"])
        if item["type"] == "extra_forbidden":
            message = "is not an option of this script"
        elif item["type"] == "missing":
            message = "is required"
        elif not isinstance(item.get("input"), dict | list) and len(repr(item.get("input"))) <= 60:
            message += f" (got {item['input']!r})"
        problems.append(f"{where}: {message}")
    return problems


def _aliases(field: Any) -> list[str]:
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        return [choice for choice in alias.choices if isinstance(choice, str)]
    return [alias] if isinstance(alias, str) else []


def _flag_shape(annotation: Any) -> tuple[str, tuple[str, ...] | None]:
    """'flag', 'list' or 'value' (with choices for a Literal), looking through `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if annotation is bool:
        return "flag", None
    if typing.get_origin(annotation) is list:
        return "list", None
    if typing.get_origin(annotation) is Literal:
        return "value", tuple(str(choice) for choice in typing.get_args(annotation))
    return "value", None
