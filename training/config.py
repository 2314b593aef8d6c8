"""Options of the training scripts: one pydantic model per script, read from flags, a YAML/TOML/JSON file or the API.

Every option is declared once, here, with its description and constraints. The command line is generated from
the model (`--max-train-steps 200` and diffusers' `--max_train_steps=200` both work), a config file gives the same
keys, flags override the file, and `POST /train` validates its `args` with the same models. Nothing here imports
torch, so the API can validate a request without loading any of it.

diffusers' example scripts (train_text_to_image_lora.py, train_dreambooth_lora.py) name some options differently;
their spellings are accepted too, with their meanings: plain renames are aliases of the field
(`--pretrained_model_name_or_path` is `--base`, `--train_data_dir` is `--dataset`, `--validation_prompt` one of
`--validation-prompts`), and the few that say the same thing in another shape are translated before validation
(`DIFFUSERS_FLAGS`: `--center_crop`, `--push_to_hub`, `--hub_model_id`).
"""

from __future__ import annotations

import argparse
import importlib.util
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
# Set by the server for runs it starts; a client of POST /train may not choose them (POST /train/{id}/resume
# continues a stopped run from its last checkpoint).
SERVER_OWNED_OPTIONS = ("output_dir", "run_id", "resume_from_checkpoint", "logging_dir")
Tracker = Literal["none", "tensorboard", "wandb", "comet_ml", "all"]
# The package each accelerate tracker needs; asked for without it, the run would fail after loading the base.
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "comet_ml": ("comet_ml",)}


class OptionsError(ValueError):
    """A config file or flag that cannot be read; the message names the key or flag."""


class RunOptions(BaseModel):
    """What every training script shares: the base, data handling, optimisation, checkpoints, validation,
    registration."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    kind: ClassVar[str] = "lora"

    # -- base and output -----------------------------------------------------------------------------------
    base: str = Field(
        "demo", min_length=1, validation_alias=AliasChoices("base", "pretrained_model_name_or_path"),
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
        description="Training size in pixels: the square's side, or with buckets the side of the square whose area "
        "every bucket keeps. Default: the base's.",
    )
    crop: Literal["center", "random"] = Field(
        "center", description="Where the training size is cut from the resized image (with buckets: the few pixels "
        "left over by the nearest bucket's shape)."
    )
    aspect_ratio_buckets: bool | None = Field(
        None, validation_alias=AliasChoices("aspect_ratio_buckets", "enable_bucket"),
        description="Train each image at the bucket (a width x height of about resolution^2 pixels) nearest its "
        "shape instead of a square crop; each batch comes from one bucket. Default: on when some image is not "
        "square.",
    )
    bucket_step: int | None = Field(
        None, ge=8, le=1024, multiple_of=8, validation_alias=AliasChoices("bucket_step", "bucket_reso_steps"),
        description="Bucket sides are multiples of this. Default: 64 from resolution 256 up, else the smallest "
        "the base allows (VAE factor x UNet downsampling).",
    )
    min_bucket_side: int | None = Field(
        None, ge=8, le=8192, validation_alias=AliasChoices("min_bucket_side", "min_bucket_reso"),
        description="Shortest bucket side in pixels; default: half the resolution.",
    )
    max_bucket_side: int | None = Field(
        None, ge=8, le=8192, validation_alias=AliasChoices("max_bucket_side", "max_bucket_reso"),
        description="Longest bucket side in pixels; default: twice the resolution.",
    )
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
    scale_lr: bool = Field(
        False, description="Multiply the learning rates by the effective batch (batch x accumulation x processes)."
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
    use_8bit_adam: bool = Field(False, description="bitsandbytes' 8-bit AdamW (needs the bitsandbytes package).")
    enable_xformers_memory_efficient_attention: bool = Field(
        False, description="xformers attention in the UNet (needs the xformers package and a GPU)."
    )
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
    report_to: Tracker = Field(
        "none", description="Also log loss, learning rate and validation images to accelerate's trackers "
        "(tensorboard, wandb, comet_ml or all installed ones); the package must be installed.",
    )
    logging_dir: Path = Field(Path("logs"), description="Tracker logs (TensorBoard), relative to --output-dir.")
    # -- validation ---------------------------------------------------------------------------------------------
    validation_prompts: list[str] = Field(
        default_factory=list, validation_alias=AliasChoices("validation_prompts", "validation_prompt"),
        description="Prompts rendered during training.",
    )
    validation_steps: int = Field(100, ge=1, description="Render the validation prompts every N steps and at the end.")
    validation_epochs: int | None = Field(
        None, ge=1, description="Render them every N epochs instead of every --validation-steps (and at the end)."
    )
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

    @model_validator(mode="before")
    @classmethod
    def _diffusers_spellings(cls, data: Any) -> Any:
        return translate_diffusers_flags(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _consistent(self) -> RunOptions:
        if self.cache_latents and self.crop == "random":
            raise ValueError("cache_latents encodes each image once, so it cannot be combined with crop=random")
        if self.resume_from_checkpoint == "latest" and self.output_dir is None:
            raise ValueError("resume_from_checkpoint=latest needs output_dir: the run folder to resume")
        if self.min_bucket_side and self.max_bucket_side and self.min_bucket_side > self.max_bucket_side:
            raise ValueError("min_bucket_side must not be larger than max_bucket_side")
        for option, packages in (("use_8bit_adam", ("bitsandbytes",)),
                                 ("enable_xformers_memory_efficient_attention", ("xformers",))):
            if getattr(self, option) and not _installed(packages):
                raise ValueError(f"{option} needs the {packages[0]} package (pip install {packages[0]})")
        needed = TRACKER_PACKAGES.get(self.report_to)
        if needed and not _installed(needed):
            raise ValueError(f"report_to={self.report_to} needs the {needed[0]} package (pip install {needed[0]}), "
                             "or leave report_to out")
        return self

    @field_validator("validation_prompts", mode="before")
    @classmethod
    def _one_prompt_is_a_list(cls, value: Any) -> Any:
        # diffusers' --validation_prompt is one string; a config file or API request may give it so.
        return [value] if isinstance(value, str) else value

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

    dataset: Path = Field(
        validation_alias=AliasChoices("dataset", "train_data_dir", "dataset_name"),
        description=DATASET_DESCRIPTION + " Through the API: an uploaded dataset's name (GET /datasets).",
    )


class TextToImageOptions(CaptionColumns, RunOptions):
    """Full text-to-image training: every weight of the UNet and the text encoder (and optionally the VAE decoder),
    starting from a base or, with --from-scratch, from new random weights of a named architecture."""

    kind: ClassVar[str] = "text_to_image"

    from_scratch: Literal["shapes-tiny"] | None = Field(
        None, description="Start from new random weights of this architecture (training/shapes_model.py) "
        "instead of from --base.",
    )
    dataset: Path | None = Field(
        None, validation_alias=AliasChoices("dataset", "train_data_dir", "dataset_name"),
        description=DATASET_DESCRIPTION + " Or give --shapes-dataset.",
    )
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
    sample_batch_size: int = Field(4, ge=1, le=64, description="Class images rendered per pipeline call.")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class images' loss.")

    @model_validator(mode="after")
    def _prior_needs_class_prompt(self) -> DreamBoothOptions:
        if self.with_prior_preservation and not self.class_prompt:
            raise ValueError("with_prior_preservation needs class_prompt (e.g. 'a photo of a dog')")
        return self


OPTIONS_BY_KIND: dict[str, type[TrainingOptions]] = {"lora": LoraOptions, "dreambooth": DreamBoothOptions}


# -- diffusers' spellings that are not plain renames ------------------------------------------------------------
# flag -> (argparse keywords, help). Translated by `translate_diffusers_flags` into the options above.
DIFFUSERS_FLAGS: dict[str, tuple[dict[str, Any], str]] = {
    "center_crop": ({"action": argparse.BooleanOptionalAction},
                    "diffusers' spelling of --crop center (--no-center_crop: --crop random). Without either, the "
                    "crop is --crop's (center), where diffusers' scripts crop at random."),
    "push_to_hub": ({"action": argparse.BooleanOptionalAction},
                    "Publish the result: here, register it in the model registry (nothing is uploaded) under "
                    "--hub_model_id's last part, or else --output-dir's folder name."),
    "hub_model_id": ({"metavar": "NAME"}, "With --push_to_hub: the name ('user/name' registers as 'name')."),
}


def translate_diffusers_flags(data: dict[str, Any]) -> dict[str, Any]:
    """diffusers' `center_crop`, `push_to_hub` and `hub_model_id` as this project's `crop` and `register_as`."""
    if not any(key in data for key in DIFFUSERS_FLAGS):
        return data
    data = dict(data)
    center = data.pop("center_crop", None)
    if center is not None:
        crop = "center" if center else "random"
        if data.get("crop", crop) != crop:
            raise ValueError(f"center_crop={center} and crop={data['crop']} contradict each other")
        data["crop"] = crop
    publish, hub_name = data.pop("push_to_hub", False), data.pop("hub_model_id", None)
    if publish:
        output = data.get("output_dir")
        name = str(hub_name).rstrip("/").rsplit("/", 1)[-1] if hub_name else (Path(output).name if output else None)
        if not name:
            raise ValueError("push_to_hub registers the result under hub_model_id or output_dir's name; give one")
        registered = data.get("register_as", data.get("register"))
        if registered is not None and registered != name:
            raise ValueError(f"push_to_hub would register {name!r} but register asks for {registered!r}")
        data["register_as"] = name
    return data


def _installed(packages: tuple[str, ...]) -> bool:
    return any(importlib.util.find_spec(package) is not None for package in packages)


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
    group = parser.add_argument_group("diffusers' spellings", "accepted as diffusers' example scripts mean them")
    for flag, (keywords, help_text) in DIFFUSERS_FLAGS.items():
        group.add_argument(f"--{flag}", dest=flag, default=argparse.SUPPRESS, help=help_text, **keywords)
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
