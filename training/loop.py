"""The training loop every script runs: accelerate, LoRA on a frozen base or full training, checkpoints, exact
resume, registration.

A script supplies only its data (`build_data`): LoRA reads captioned images, DreamBooth pairs instance images with
generated class images, full text-to-image training reads captioned images or draws shapes. What trains is LoRA
layers (`adapters.LoraWeights`) or, for full training, the whole UNet and text encoder and optionally the VAE
decoder (`full_model.FullWeights`). Everything else happens here, in this order:

1. Accelerator, run id and seed (shared by every process; taken from the checkpoint when resuming).
2. The base, resolved by registry name or path and loaded through the server's pipeline code, or for a model
   trained from scratch, new random weights of its architecture.
3. The script's data (DreamBooth renders missing class images here, with the untouched base), then its
   aspect-ratio buckets (training/data.py) when its images are not square.
4. Frozen weights cast to the mixed precision; trained weights (LoRA layers, or whole models) made trainable and
   kept in float32; latents cached if asked.
5. Dataloader, AdamW, learning-rate schedule, all prepared by accelerate; checkpoint hooks save only the trained
   weights.
6. Resume: accelerate restores optimizer, schedule and RNG states, the noise generator is reloaded and the batches
   already seen in the current epoch are skipped, so the run continues as if it had never stopped.
7. Steps: noise, timesteps, the family's text conditioning (training/conditioning.py: SDXL adds its second text
   encoder and size conditioning), MSE on the noise (or v, or clean latent) target, min-SNR weights,
   prior-preservation loss; with a trained VAE decoder, its reconstruction error too.
8. The weights file with its metadata (a full run: the model folder, packed file and manifest), final validation
   images and the registry entry.

Along the way the run folder gets `loss.png` and `validation_grid.png` (training/plots.py), and with
`--report_to` accelerate's trackers (TensorBoard, ...) get the loss, learning rate and validation images.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from models.errors import InvalidRequest, SdserveError
from models.registry import Registry
from models.settings import Settings, get_settings
from training import adapters
from training.base_model import BaseChoice, load_base, make_renderer, resolve_base, scratch_base, weights_sha256
from training.checkpoints import STATE_FILE, latest_checkpoint, list_checkpoints
from training.conditioning import TextConditioning
from training.config import RunOptions, TextToImageOptions, TrainingOptions
from training.data import (
    BucketBatchSampler,
    Collate,
    ImageCaptionDataset,
    PairedDataset,
    bucket_table,
    image_size,
    nearest_bucket,
)
from training.dataset_files import Example, dataset_sha256
from training.full_model import FullWeights
from training.lifeline import ServerLifeline
from training.plots import LOSS_PLOT, VALIDATION_GRID, save_loss_plot, save_validation_grid
from training.progress import PROGRESS_FILE, ProgressReporter, read_progress
from training.registration import check_registration

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"


@dataclass
class TrainingData:
    """What a script hands the loop."""

    dataset: ImageCaptionDataset | PairedDataset
    examples: list[Example]  # hashed into the metadata
    trigger_words: list[str]
    metadata: dict[str, str] = field(default_factory=dict)  # e.g. the instance prompt
    prior_loss_weight: float = 0.0


@dataclass
class RunContext:
    """What `build_data` may use: the options, the loaded base and a way to render images with it."""

    options: RunOptions
    accelerator: Accelerator
    output_dir: Path
    run_id: str
    seed: int
    resolution: int
    base: BaseChoice
    render: Callable[[str, int, int, int, float, int], list[Image.Image]]
    report: Callable[..., None]


DataBuilder = Callable[[RunContext], TrainingData]
StopCheck = Callable[[int], bool]


@dataclass
class TrainingResult:
    output_dir: Path
    weights: Path
    run_id: str
    steps: int
    losses: list[float]
    registered: str | None


class TrainingStopped(Exception):
    """Stopped on request (signal or `should_stop`) after saving a checkpoint to resume from."""

    def __init__(self, step: int, checkpoint: Path):
        self.step, self.checkpoint = step, checkpoint
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}")


def train(
    options: RunOptions, build_data: DataBuilder, settings: Settings | None = None,
    should_stop: StopCheck | None = None,
) -> TrainingResult:
    settings = settings or get_settings()
    # 1. Accelerator, identity, seed.
    accelerator = Accelerator(
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        mixed_precision=options.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        # The trackers' folder is made absolute once the run folder is known (_start_trackers).
        log_with=None if options.report_to == "none" else options.report_to,
        project_config=ProjectConfiguration(logging_dir=str(options.logging_dir)),
    )
    try:
        return _Run(options, build_data, settings, accelerator, should_stop or (lambda step: False)).execute()
    finally:
        if options.report_to != "none":
            accelerator.end_training()
        accelerator.free_memory()
        # accelerate keeps its state in process-wide singletons; a later train() in this process (a notebook,
        # the tests) may want another precision. accelerate's own test suite resets them the same way.
        AcceleratorState._reset_state()
        GradientState._reset_state()


class _Run:
    def __init__(
        self, options: RunOptions, build_data: DataBuilder, settings: Settings, accelerator: Accelerator,
        should_stop: StopCheck,
    ):
        self.options = options
        self.build_data = build_data
        self.settings = settings
        self.accelerator = accelerator
        self.should_stop = should_stop
        self.main = accelerator.is_main_process

    # -- the procedure ----------------------------------------------------------------------------------------------
    def execute(self) -> TrainingResult:
        checkpoint = self._start()
        self._load_base(checkpoint)
        context = RunContext(self.options, self.accelerator, self.output_dir, self.run_id, self.seed,
                             self.resolution, self.base, make_renderer(self.pipeline, self.model), self.progress.event)
        self.data = self.build_data(context)  # 3. with the untouched base (DreamBooth renders class images)
        self.bucket_sampler = self._plan_buckets()
        self._make_trainable()
        self._prepare_training()
        self._register_checkpoint_hooks()
        self._resume(checkpoint)
        self._start_trackers()
        self.losses: list[float] = []
        self.loss_points = self._earlier_losses()
        try:
            self._train_steps()
            return self._finish()
        finally:
            self.progress.close()
            self._save_loss_plot()

    def _start(self) -> Path | None:
        """1. Precision check, the checkpoint to resume, run id, seed, output folder, progress."""
        options, accelerator = self.options, self.accelerator
        if accelerator.device.type == "cpu" and accelerator.mixed_precision == "fp16":
            raise InvalidRequest("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
        if options.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        checkpoint = self._checkpoint_to_resume()
        self.saved = _read_state(checkpoint) if checkpoint else {}
        self.run_id, self.seed = self._identity(self.saved)
        self.output_dir = Path(options.output_dir or (checkpoint.parent if checkpoint else None)
                               or self.settings.output_dir / "training" / self.run_id)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        accelerator.dataloader_config.data_seed = self.seed
        set_seed(self.seed)  # the same LoRA initialisation on every process
        self.progress = ProgressReporter(self.output_dir, enabled=self.main)
        return checkpoint

    def _load_base(self, checkpoint: Path | None) -> None:
        """2. The base by registry name or path (or new weights), frozen, with the noise schedule it trains with."""
        options = self.options
        registry = Registry(self.settings.registry_path)
        from_scratch = options.from_scratch if isinstance(options, TextToImageOptions) else None
        if from_scratch:
            self.base, self.pipeline, self.model = scratch_base(from_scratch, self.seed, self.accelerator.device,
                                                               self.settings, registry)
        else:
            self.base = resolve_base(options.base, registry)
        check_registration(options, self.base, registry)
        if not from_scratch:
            self.pipeline, self.model = load_base(self.base, self.settings, self.accelerator.device)
        self.conditioning = TextConditioning(self.pipeline, self.model.family)
        self.unet, self.vae = self.pipeline.unet, self.pipeline.vae
        self.text_encoders = self.conditioning.encoders
        for module in (self.unet, self.vae, *self.text_encoders.values()):
            module.requires_grad_(False)
        self.base_sha256 = weights_sha256(self.unet, *self.text_encoders.values(), self.vae) if self.main else ""
        self.resolution = options.resolution or self.model.default_size()[0]
        if options.prediction_type:
            # Validation images must sample with the target the LoRA learns.
            self.model.scheduler_config = {**self.model.scheduler_config, "prediction_type": options.prediction_type}
            # And a fully trained model is saved with the target it learnt.
            self.pipeline.scheduler = type(self.pipeline.scheduler).from_config(self.model.scheduler_config)
        self.noise_scheduler = DDPMScheduler.from_config(self.model.scheduler_config)
        self.progress.event("start", run_id=self.run_id, kind=options.kind, base=self.base.label, seed=self.seed,
                            output_dir=str(self.output_dir), processes=self.accelerator.num_processes,
                            resume_from=str(checkpoint) if checkpoint else None)

    def _make_trainable(self) -> None:
        """4. Frozen weights in the mixed precision, trained weights in float32, latents cached if asked."""
        options = self.options
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision,
                                                                                 torch.float32)
        # SDXL's VAE overflows in float16 (its config says force_upcast): it encodes in float32 whatever the rest.
        self.vae_dtype = torch.float32 if self.vae.config.get("force_upcast") else self.weight_dtype
        if self.weight_dtype != torch.float32:
            for module in (self.unet, *self.text_encoders.values()):
                module.to(dtype=self.weight_dtype)
            self.vae.to(dtype=self.vae_dtype)
        if isinstance(options, TextToImageOptions):
            self.weights: FullWeights | adapters.LoraWeights = FullWeights(options, self.pipeline)
        else:
            assert isinstance(options, TrainingOptions)
            self.weights = adapters.LoraWeights(options, self.unet, self.text_encoders,
                                                two_text_encoders=self.conditioning.two_encoders)
        self.weights.attach()
        self.trained_text_encoders = {name: encoder for name, encoder in self.text_encoders.items()
                                      if name in self.weights.trained}
        self.trained_vae = self.weights.trained.get("vae")
        if self.weight_dtype != torch.float32:
            adapters.keep_trainable_in_float32(*self.weights.trained.values())
        if options.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            for encoder in self.trained_text_encoders.values():
                # transformers 5 renamed it; 4.x has only the old name.
                getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
        if options.cache_latents:
            cache_generator = torch.Generator("cpu").manual_seed(self.seed)
            self.data.dataset.cache_latents(lambda pixels: self._encode(pixels, cache_generator))

    # -- identity, checkpoints, resume (1 and 6) ---------------------------------------------------------------------
    def _identity(self, saved: dict[str, Any]) -> tuple[str, int]:
        """Every process must agree on the run id and seed; a resumed run keeps the ones it started with."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        drawn_seed = saved.get("seed", int.from_bytes(os.urandom(4), "big"))
        proposal = [
            self.options.run_id or saved.get("run_id") or f"{self.options.kind}-{stamp}-{uuid.uuid4().hex[:6]}",
            self.options.seed if self.options.seed is not None else drawn_seed,
        ]
        if self.accelerator.num_processes > 1:
            broadcast_object_list(proposal)
        if saved and saved.get("seed") != proposal[1]:
            logger.warning("resuming with seed %s, but the checkpoint was made with seed %s: not an exact resume",
                           proposal[1], saved.get("seed"))
        return str(proposal[0]), int(proposal[1])

    def _checkpoint_to_resume(self) -> Path | None:
        requested = self.options.resume_from_checkpoint
        if requested is None:
            return None
        if requested == "latest":
            assert self.options.output_dir is not None  # checked by the options model
            latest = latest_checkpoint(self.options.output_dir)
            if latest is None:
                # As diffusers' scripts do: the same command starts a run and continues it after an interruption.
                logger.warning("no checkpoint in %s yet: starting a new run", self.options.output_dir)
            return latest
        path = Path(requested)
        if not (path / STATE_FILE).is_file():
            raise InvalidRequest(f"{path} is not a checkpoint of this trainer (no {STATE_FILE})")
        return path

    def _register_checkpoint_hooks(self) -> None:
        """Checkpoints hold the trained weights only (LoRA: megabytes), never a copy of the frozen base (gigabytes)."""

        def save_hook(models: list[torch.nn.Module], weights: list[Any], folder: str) -> None:
            if self.main:
                self.weights.save_checkpoint(Path(folder))
            weights.clear()

        def load_hook(models: list[torch.nn.Module], folder: str) -> None:
            self.weights.load_checkpoint(Path(folder))
            models.clear()

        self.accelerator.register_save_state_pre_hook(save_hook)
        self.accelerator.register_load_state_pre_hook(load_hook)

    def _save_checkpoint(self) -> Path:
        """checkpoint-N, written under a temporary name and renamed, so a crash never leaves a half checkpoint."""
        accelerator, step = self.accelerator, self.global_step
        final = self.output_dir / f"checkpoint-{step}"
        partial = self.output_dir / f".checkpoint-{step}.partial"
        if self.main:
            self._prune_checkpoints()
            shutil.rmtree(partial, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        save_file({"state": self.noise_generator.get_state()},
                  str(partial / f"noise_generator_{accelerator.process_index}.safetensors"))
        if self.main:
            state = {"step": step, "run_id": self.run_id, "seed": self.seed, "max_train_steps": self.max_steps}
            (partial / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        accelerator.wait_for_everyone()
        if self.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            self.progress.event("checkpoint", step=step, path=str(final))
        accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self) -> None:
        limit = self.options.checkpoints_total_limit
        if limit is None:
            return
        existing = list_checkpoints(self.output_dir)
        for old in existing[: max(0, len(existing) - (limit - 1))]:
            logger.info("removing old checkpoint %s (limit %d)", old, limit)
            shutil.rmtree(old, ignore_errors=True)

    def _resume(self, checkpoint: Path | None) -> None:
        """6. Optimizer, schedule, RNG states and LoRA weights from the checkpoint; the noise generator too."""
        self.global_step = 0
        self.noise_generator = torch.Generator("cpu").manual_seed(self.seed + self.accelerator.process_index)
        if checkpoint is None:
            return
        saved = self.saved
        if saved.get("max_train_steps") not in (None, self.max_steps):
            logger.warning("the checkpoint planned %s steps and this run %s: the learning-rate schedule changes",
                           saved.get("max_train_steps"), self.max_steps)
        self.accelerator.load_state(str(checkpoint))
        generator_file = checkpoint / f"noise_generator_{self.accelerator.process_index}.safetensors"
        if generator_file.is_file():
            self.noise_generator.set_state(load_file(str(generator_file))["state"])
        else:
            logger.warning("%s has no noise state for process %d: continuing with fresh noise", checkpoint,
                           self.accelerator.process_index)
        self.global_step = int(saved["step"])
        logger.info("resumed from %s at step %d", checkpoint, self.global_step)

    # -- 3b. aspect-ratio buckets -----------------------------------------------------------------------------------
    def _plan_buckets(self) -> BucketBatchSampler | None:
        """Each image's bucket; on when asked, or by default when some image's bucket is not the square."""
        options, dataset = self.options, self.data.dataset
        bucketed = dataset.instances if isinstance(dataset, PairedDataset) else dataset
        if options.aspect_ratio_buckets is False or not isinstance(bucketed, ImageCaptionDataset):
            return None  # off, or pictures drawn square on the fly (--shapes-dataset)
        table = bucket_table(self.resolution, self._bucket_step(), options.min_bucket_side, options.max_bucket_side)
        if not table:
            logger.warning("no bucket fits resolution %d with these bucket sides: training square crops",
                           self.resolution)
            return None
        sizes = [nearest_bucket(image_size(example.image), table) for example in bucketed.examples]
        square = nearest_bucket((1, 1), table)
        if options.aspect_ratio_buckets is None and all(size == square for size in sizes):
            return None
        bucketed.use_sizes(sizes)
        counts = {f"{width}x{height}": sizes.count((width, height)) for width, height in table}
        logger.info("aspect-ratio buckets (width x height: images): %s",
                    ", ".join(f"{name}: {count}" for name, count in counts.items()))
        self.progress.event("buckets", resolution=self.resolution, buckets=counts)
        return BucketBatchSampler(dataset.sizes, self.options.train_batch_size, self.seed)

    def _bucket_step(self) -> int:
        """Bucket sides are multiples of what the UNet needs (VAE factor x its downsampling), and of 64 (kohya's
        step) from resolution 256 up."""
        config = self.unet.config
        needed = self.pipeline.vae_scale_factor * 2 ** (len(config.block_out_channels) - 1)
        requested = self.options.bucket_step
        if requested is not None:
            if requested % needed:
                raise InvalidRequest(f"bucket_step {requested} is not a multiple of {needed}, which this base needs")
            return requested
        return math.lcm(needed, 64) if self.resolution >= 256 else needed

    # -- 5. dataloader, optimizer, schedule -------------------------------------------------------------------------
    def _prepare_training(self) -> None:
        options, accelerator = self.options, self.accelerator
        if options.enable_xformers_memory_efficient_attention:
            self.unet.enable_xformers_memory_efficient_attention()
        common = {"collate_fn": Collate(*self.conditioning.tokenizers), "num_workers": options.dataloader_num_workers}
        if self.bucket_sampler is not None:
            loader = DataLoader(self.data.dataset, batch_sampler=self.bucket_sampler, **common)
        else:
            loader = DataLoader(self.data.dataset, batch_size=options.train_batch_size, shuffle=True, **common)
        self.dataloader = accelerator.prepare(loader)
        # Per process, after sharding; the last accumulation of an epoch may be short (accelerate syncs there).
        self.updates_per_epoch = math.ceil(len(self.dataloader) / options.gradient_accumulation_steps)
        self.max_steps = options.max_train_steps or options.num_train_epochs * self.updates_per_epoch
        self.num_epochs = math.ceil(self.max_steps / self.updates_per_epoch)
        scale = (options.train_batch_size * options.gradient_accumulation_steps * accelerator.num_processes
                 if options.scale_lr else 1)
        groups = [{"params": adapters.trainable_parameters(self.unet), "lr": options.learning_rate * scale}]
        if self.trained_text_encoders:
            groups.append({"params": adapters.trainable_parameters(*self.trained_text_encoders.values()),
                           "lr": (options.text_encoder_learning_rate or options.learning_rate) * scale})
        if self.trained_vae is not None:
            groups.append({"params": adapters.trainable_parameters(self.trained_vae),
                           "lr": options.learning_rate * scale})
        optimizer = _adamw(options.use_8bit_adam)(groups, betas=(options.adam_beta1, options.adam_beta2),
                                                  weight_decay=options.adam_weight_decay, eps=options.adam_epsilon)
        # accelerate steps a prepared schedule once per process per optimizer step.
        schedule = get_scheduler(
            options.lr_scheduler, optimizer,
            num_warmup_steps=options.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=self.max_steps * accelerator.num_processes,
            num_cycles=options.lr_num_cycles, power=options.lr_power,
        )
        trained = [self.unet, *self.trained_text_encoders.values(),
                   *([self.trained_vae] if self.trained_vae is not None else [])]
        prepared = accelerator.prepare(*trained, optimizer, schedule)
        # The wrapped models (DDP) run the training forward; the plain ones are saved and used by the pipeline.
        self.unet_forward = prepared[0]
        wrapped = dict(zip(self.trained_text_encoders, prepared[1:1 + len(self.trained_text_encoders)], strict=True))
        self.text_encoder_forwards = {name: wrapped.get(name, encoder) for name, encoder in self.text_encoders.items()}
        self.vae_forward = prepared[len(trained) - 1] if self.trained_vae is not None else None
        self.optimizer, self.lr_schedule = prepared[-2], prepared[-1]
        self.trained_models = prepared[:-2]

    # -- 7. steps ---------------------------------------------------------------------------------------------------
    def _train_steps(self) -> None:
        options, accelerator = self.options, self.accelerator
        ga = options.gradient_accumulation_steps
        self.progress.start_bar(self.max_steps, self.global_step)
        parameters = adapters.trainable_parameters(self.unet, *self.trained_text_encoders.values(), self.trained_vae)
        first_epoch = self.global_step // self.updates_per_epoch
        logger.info("training %d steps (%d epochs of %d steps), %d examples, batch %d x %d accumulation x %d "
                    "processes", self.max_steps, self.num_epochs, self.updates_per_epoch, len(self.data.dataset),
                    options.train_batch_size, ga, accelerator.num_processes)
        loss_sum, micro_batches = torch.zeros((), device=accelerator.device), 0
        for epoch in range(first_epoch, self.num_epochs):
            for model in self.trained_models:
                model.train()
            self.data.dataset.set_epoch(epoch)
            self.dataloader.set_epoch(epoch)
            if self.bucket_sampler is not None:
                # accelerate passes the epoch on to a sampler it wraps for several processes only.
                self.bucket_sampler.set_epoch(epoch)
            batches = self.dataloader
            seen = (self.global_step - epoch * self.updates_per_epoch) * ga
            if seen > 0:
                batches = accelerator.skip_first_batches(self.dataloader, seen)
            for batch in batches:
                with accelerator.accumulate(*self.trained_models):
                    # time ids end with the target (height, width): the batch's size, its bucket.
                    self.batch_size_px = [int(side) for side in batch["time_ids"][0, 4:6].flip(0).tolist()]
                    loss = self._loss(batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(parameters, options.max_grad_norm)
                    self.optimizer.step()
                    self.lr_schedule.step()
                    self.optimizer.zero_grad(set_to_none=True)
                loss_sum += accelerator.reduce(loss.detach(), reduction="mean")
                micro_batches += 1
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                step_loss = loss_sum.item() / micro_batches
                loss_sum.zero_()
                micro_batches = 0
                self._after_step(step_loss, epoch)
                if self.global_step >= self.max_steps:
                    return
            epochs = self.options.validation_epochs
            if epochs is not None and (epoch + 1) % epochs == 0 and self.global_step < self.max_steps:
                self._validate()

    def _after_step(self, loss: float, epoch: int) -> None:
        options, step = self.options, self.global_step
        self.losses.append(loss)
        self.loss_points.append((step, loss))
        lr = self.lr_schedule.get_last_lr()[0]
        self.progress.advance(loss, lr)
        if step % options.logging_steps == 0 or step == self.max_steps:
            self.progress.log_step(step, loss, lr, epoch, self.max_steps, size=self.batch_size_px)
        if options.report_to != "none":
            self.accelerator.log({"loss": loss, "lr": lr}, step=step)
        if step % options.checkpointing_steps == 0:
            self._save_checkpoint()
            self._save_loss_plot()
        if options.validation_epochs is None and step % options.validation_steps == 0 and step < self.max_steps:
            self._validate()
        if self._stop_requested() and step < self.max_steps:
            checkpoint = self._save_checkpoint() if step % options.checkpointing_steps else self._checkpoint_path()
            self.progress.event("stopped", step=step, checkpoint=str(checkpoint))
            raise TrainingStopped(step, checkpoint)

    def _checkpoint_path(self) -> Path:
        return self.output_dir / f"checkpoint-{self.global_step}"

    def _stop_requested(self) -> bool:
        wanted = self.should_stop(self.global_step)
        if self.accelerator.num_processes == 1:
            return wanted
        # A signal may reach only some processes; all must stop at the same step or the others hang.
        flag = torch.tensor(float(wanted), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _encode(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            pixels = pixels.to(self.accelerator.device, dtype=self.vae_dtype)
            latents = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        return (latents * self.vae.config.scaling_factor).to(self.weight_dtype)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        device, generator = self.accelerator.device, self.noise_generator
        if "latents" in batch:
            latents = batch["latents"].to(device, dtype=self.weight_dtype)
        else:
            latents = self._encode(batch["pixel_values"], generator)
        batch_size = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(device, latents.dtype)
        if self.options.noise_offset:
            offset = torch.randn((batch_size, latents.shape[1], 1, 1), generator=generator)
            noise = noise + self.options.noise_offset * offset.to(device, latents.dtype)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator).to(device)
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(bool(self.trained_text_encoders)):
            hidden_states, added_conditions = self.conditioning.unet_inputs(self.text_encoder_forwards, batch, device,
                                                                            self.weight_dtype)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        elif prediction_type == "sample":
            target = latents
        else:
            target = noise
        prediction = self.unet_forward(noisy_latents, timesteps, hidden_states, added_cond_kwargs=added_conditions,
                                       return_dict=False)[0]
        per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.options.snr_gamma is not None:
            per_example = per_example * self._min_snr_weights(timesteps)
        prior = batch["prior"].to(device)
        loss = per_example[~prior].mean()
        if prior.any():
            loss = loss + self.data.prior_loss_weight * per_example[prior].mean()
        if self.vae_forward is not None and "pixel_values" in batch:
            loss = loss + self._decoder_loss(batch["pixel_values"])
        return loss

    def _decoder_loss(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE's reconstruction error on the first few images: encode (frozen) and decode (trained)."""
        pixels = pixels[: self.options.vae_decoder_images].to(self.accelerator.device, dtype=self.weight_dtype)
        redrawn = self.vae_forward(pixels, sample_posterior=False, return_dict=False)[0]
        return F.mse_loss(redrawn.float(), pixels.float())

    def _min_snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for noise targets, / (SNR + 1) for v, as is
        for clean-latent targets."""
        snr = compute_snr(self.noise_scheduler, timesteps)
        clipped = torch.clamp(snr, max=self.options.snr_gamma)
        prediction_type = self.noise_scheduler.config.prediction_type
        if prediction_type == "v_prediction":
            return clipped / (snr + 1)
        if prediction_type == "sample":
            return clipped
        return clipped / snr

    # -- what the run folder and trackers show -----------------------------------------------------------------------
    def _start_trackers(self) -> None:
        """accelerate's trackers (--report_to) write into <output>/<logging_dir>, with the options as their config."""
        options = self.options
        if options.report_to == "none":
            return
        self.accelerator.project_configuration.logging_dir = str(self.output_dir / options.logging_dir)
        config = {key: value if isinstance(value, int | float | str | bool) else json.dumps(value)
                  for key, value in options.model_dump(mode="json").items()}
        self.accelerator.init_trackers(f"sdserve-{options.kind}", config=config)

    def _earlier_losses(self) -> list[tuple[int, float]]:
        """The logged losses of the steps before a resume, so the loss plot shows the whole run."""
        if not self.global_step or not self.main:
            return []
        return [(event["step"], event["loss"]) for event in read_progress(self.output_dir / PROGRESS_FILE)
                if event.get("event") == "step" and event.get("step", 0) <= self.global_step and "loss" in event]

    def _save_loss_plot(self) -> None:
        if self.main and getattr(self, "loss_points", None):
            save_loss_plot(self.loss_points, self.output_dir / LOSS_PLOT)

    def _save_validation_grid(self) -> None:
        rounds = [(event["step"], [Path(path) for path in event.get("images", []) if Path(path).is_file()])
                  for event in read_progress(self.output_dir / PROGRESS_FILE) if event.get("event") == "validation"]
        save_validation_grid(rounds, self.output_dir / VALIDATION_GRID)

    def _track_images(self, files: list[str]) -> None:
        """Validation images to TensorBoard (the tracker that takes plain arrays)."""
        if self.options.report_to not in ("tensorboard", "all") or not files:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                images = []
                for file in files:
                    with Image.open(file) as opened:
                        images.append(np.asarray(opened.convert("RGB")))
                if len({image.shape for image in images}) == 1:
                    tracker.writer.add_images("validation", np.stack(images), self.global_step, dataformats="NHWC")

    # -- validation and 8. output -----------------------------------------------------------------------------------
    def _validate(self) -> None:
        options = self.options
        if not options.validation_prompts or not self.main:
            return
        folder = self.output_dir / "validation"
        folder.mkdir(exist_ok=True)
        self.unet.eval()
        for encoder in self.text_encoders.values():
            encoder.eval()
        started = time.perf_counter()
        render = make_renderer(self.pipeline, self.model)
        saved = []
        with self.accelerator.autocast():
            for number, prompt in enumerate(options.validation_prompts):
                images = render(prompt, self.seed, self.resolution, options.validation_inference_steps,
                                options.validation_guidance_scale, options.num_validation_images)
                for index, image in enumerate(images):
                    path = folder / f"step-{self.global_step:06d}-prompt-{number}-{index}.png"
                    image.save(path)
                    saved.append(str(path))
        for model in self.trained_models:
            model.train()
        self.progress.event("validation", step=self.global_step, images=saved,
                            seconds=round(time.perf_counter() - started, 2))
        self._save_validation_grid()
        self._save_loss_plot()
        self._track_images(saved)

    def _finish(self) -> TrainingResult:
        accelerator, options = self.accelerator, self.options
        accelerator.wait_for_everyone()
        weights = self.output_dir / self.weights.result_name
        registered = None
        if self.main:
            self.weights.save_result(self.output_dir, self._metadata())
            self._validate()  # steps skip validation at the last step: this is it, with the saved weights
            lifeline = ServerLifeline.from_environment()
            orphaned = lifeline is not None and not lifeline.alive(now=True)
            if options.register_as and orphaned:
                # The server that started this run is gone: nobody asked for this model any more.
                logger.warning("the server that started this run is gone: %s is saved but not registered as %r",
                               weights, options.register_as)
            elif options.register_as:
                self.weights.register(Registry(self.settings.registry_path), self.base, weights, self.run_id,
                                      self.data.trigger_words)
                registered = options.register_as
            self.progress.event("done", step=self.global_step, output=str(weights), registered=registered,
                                run_id=self.run_id, **({"server_gone": True} if orphaned else {}))
        accelerator.wait_for_everyone()
        return TrainingResult(self.output_dir, weights, self.run_id, self.global_step, self.losses, registered)

    def _metadata(self) -> dict[str, str]:
        options = self.options
        metadata = {
            "format_version": FORMAT_VERSION,
            "kind": options.kind,
            "run_id": self.run_id,
            "created_at": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
            "base_model": self.base.label,
            "base_source": self.base.entry.source,
            "base_sha256": self.base_sha256,
            "base_family": self.model.family.name,
            **self.weights.describe(),
            "steps": str(self.global_step),
            "resolution": str(self.resolution),
            "learning_rate": str(options.learning_rate),
            "train_batch_size": str(options.train_batch_size * self.accelerator.num_processes
                                    * options.gradient_accumulation_steps),
            "seed": str(self.seed),
            "prediction_type": str(self.noise_scheduler.config.prediction_type),
            "dataset_sha256": dataset_sha256(self.data.examples, extra=json.dumps(self.data.metadata, sort_keys=True)),
            "num_examples": str(len(self.data.examples)),
            "trigger_words": json.dumps(self.data.trigger_words),
        }
        return metadata | self.data.metadata


def _adamw(eight_bit: bool) -> type[torch.optim.Optimizer]:
    if not eight_bit:
        return torch.optim.AdamW
    import bitsandbytes  # checked to be installed by the options

    return bitsandbytes.optim.AdamW8bit


# -- checkpoints on disk (found by training/checkpoints.py) ---------------------------------------------------------
def _read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


# -- command line ---------------------------------------------------------------------------------------------------
class StopOnSignal:
    """SIGTERM or Ctrl-C asks the loop to checkpoint and stop at the next step; a second Ctrl-C stops at once.
    A run the server started also stops when that server is gone (training/lifeline.py)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.lifeline = ServerLifeline.from_environment()
        self.server_gone = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, number: int, frame: Any) -> None:
        if self.signal is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = number
        logger.warning("%s received: saving a checkpoint and stopping after this step",
                       signal.Signals(number).name)

    def __call__(self, step: int) -> bool:
        if self.lifeline is not None and not self.server_gone and not self.lifeline.alive():
            self.server_gone = True
            logger.warning("the server that started this run (pid %d) is gone: saving a checkpoint and stopping "
                           "without registering anything", self.lifeline.pid)
        return self.signal is not None or self.server_gone


def run(options: RunOptions, build_data: DataBuilder) -> int:
    """A script's body: train, and turn known failures into a message and an exit status (2: bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "PIL", "urllib3", "accelerate.checkpointing"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stop = StopOnSignal()
    try:
        result = train(options, build_data, should_stop=stop)
    except TrainingStopped as stopped:
        logger.warning("%s; continue with --resume-from-checkpoint latest --output-dir %s", stopped,
                       stopped.checkpoint.parent)
        return 128 + (stop.signal or signal.SIGTERM)
    except SdserveError as error:
        logger.error("%s", error)
        return 2
    logger.info("done: %s (%d steps)%s", result.weights, result.steps,
                f", registered as {result.registered!r}" if result.registered else "")
    return 0
