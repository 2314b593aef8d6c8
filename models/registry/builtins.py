"""Builders for the models this project makes itself: tiny pipelines of every family and real-size presets.

Nothing here downloads anything. Each builder is deterministic (fixed seed), writes a diffusers folder that
`from_pretrained` loads like any checkpoint, and is cached: a second call returns the existing folder.

The tiny models (`demo:tiny` for SD 1.x, `demo:sdxl-tiny`, `demo:sdxl-refiner-tiny`, `demo:sd3-tiny`,
`demo:flux-tiny`) use the real component classes with scaled-down configs, tokenizers written in code and the
pass-through VAE of components.py, so img2img and inpainting keep their input while the denoiser and text encoders
are random. They build in about a second and exercise every code path; their images are noise. The real-size
presets (`demo:sd15`, `demo:sdxl`, `demo:sd3-medium`) have the real architectures with random weights, for
benchmarks that must reflect real compute. One builtin is trained: `demo:shapes`, the default model, unpacked
from its committed weights file (models/shapes.py).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from filelock import FileLock
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from models import shapes
from models.registry.components import (
    clip_tokenizer,
    pass_through_vae,
    t5_tokenizer,
    tiny_clip_text_encoder,
    tiny_clip_text_encoder_with_projection,
    tiny_t5_encoder,
)
from models.registry.entries import FamilyName

logger = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when a builder changes, so stale caches are rebuilt


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def build_demo_pipeline() -> StableDiffusionPipeline:
    """The tiny random-weight pipeline (UNet, text encoder) with the pass-through VAE."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(len(tokenizer))
    unet = _tiny_unet()
    vae = pass_through_vae()
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_sd15_preset() -> StableDiffusionPipeline:
    """SD 1.5's real architecture (UNet 860M, CLIP ViT-L text encoder, VAE) with random weights, for benchmarks."""
    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
        )
    )
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


# -- SDXL -----------------------------------------------------------------------------------------------------------
_SDXL_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                   "timestep_spacing": "leading"}
_TIME_EMBED = 8  # the size-conditioning embedding of the tiny SDXL UNets (256 in SDXL)
# The second text encoder is wider than the first, as in SDXL (1280 vs 768): single-file loading tells them apart
# by width.
_SDXL_ENCODER_2_WIDTH = 48


def _tiny_sdxl_unet(cross_attention_dim: int, time_ids: int, pooled_dim: int) -> UNet2DConditionModel:
    """SDXL's UNet layout scaled down: linear projections, several transformer layers in the deeper block and the
    "text_time" added conditioning (pooled text embedding + `time_ids` size/crop numbers)."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=_TIME_EMBED,
        projection_class_embeddings_input_dim=time_ids * _TIME_EMBED + pooled_dim,
        norm_num_groups=16,
    )


def build_sdxl_tiny() -> StableDiffusionXLPipeline:
    """Tiny SDXL: two CLIP text encoders of different widths like SDXL's (the second with a projection, whose pooled
    output conditions the UNet), the UNet's cross-attention over both encoders' hidden states, six size/crop time
    ids."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    text_encoder = tiny_clip_text_encoder(len(tokenizer))
    text_encoder_2 = tiny_clip_text_encoder_with_projection(len(tokenizer_2), hidden_size=_SDXL_ENCODER_2_WIDTH)
    unet = _tiny_sdxl_unet(cross_attention_dim=32 + _SDXL_ENCODER_2_WIDTH, time_ids=6, pooled_dim=32)
    return StableDiffusionXLPipeline(
        vae=pass_through_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**_SDXL_SCHEDULER),
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def build_sdxl_refiner_tiny() -> StableDiffusionXLImg2ImgPipeline:
    """Tiny SDXL refiner: like SDXL's refiner, the second text encoder only, and an aesthetic score in place of the
    target size among its five time ids. It runs the last steps of an SDXL base's denoising, or img2img alone."""
    torch.manual_seed(1)
    tokenizer_2 = clip_tokenizer()
    text_encoder_2 = tiny_clip_text_encoder_with_projection(len(tokenizer_2), hidden_size=_SDXL_ENCODER_2_WIDTH)
    unet = _tiny_sdxl_unet(cross_attention_dim=_SDXL_ENCODER_2_WIDTH, time_ids=5, pooled_dim=32)
    return StableDiffusionXLImg2ImgPipeline(
        vae=pass_through_vae(), text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**_SDXL_SCHEDULER),
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False,
    )


def build_sdxl_preset() -> StableDiffusionXLPipeline:
    """SDXL base's real architecture (UNet 2.6B, CLIP ViT-L and OpenCLIP bigG text encoders, VAE) with random
    weights: about 13.5 GB in float32."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    vocab = len(tokenizer)
    special = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768, **special))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280, **special))
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
        cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=1024,
        scaling_factor=0.13025,
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=EulerDiscreteScheduler(**_SDXL_SCHEDULER),
        add_watermarker=False,
    )


def build_sdxl_controlnet_tiny() -> ControlNetModel:
    """A ControlNet for the tiny SDXL UNet (its size conditioning included), made like demo:controlnet-tiny."""
    return _controlnet_from(build_sdxl_tiny().unet)


# -- SD 3.x and FLUX: flow-matching transformers --------------------------------------------------------------------
def build_sd3_tiny() -> StableDiffusion3Pipeline:
    """Tiny SD 3.x: an MMDiT transformer (patch 2 over 16 latent channels), two CLIP encoders with projections
    (their pooled outputs concatenated) and a T5 encoder, and a flow-matching scheduler."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    text_encoder = tiny_clip_text_encoder_with_projection(len(tokenizer))
    text_encoder_2 = tiny_clip_text_encoder_with_projection(len(tokenizer_2))
    text_encoder_3 = tiny_t5_encoder(len(tokenizer_3), d_model=64)  # as wide as both CLIPs together, like SD3
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=48,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=pass_through_vae(latent_channels=16, quant_convs=False), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_sd3_medium_preset() -> StableDiffusion3Pipeline:
    """SD 3 Medium's transformer (2B), CLIP-L and CLIP-G encoders and VAE with random weights, without the T5-XXL
    encoder (4.7B, optional in SD 3: its embedding is then zeros), so it fits 24 GB: about 11 GB in float32."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer()
    vocab = len(tokenizer)
    special = {"bos_token_id": vocab - 2, "eos_token_id": vocab - 1, "pad_token_id": vocab - 1}
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", projection_dim=768, **special))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        hidden_act="gelu", projection_dim=1280, **special))
    transformer = SD3Transformer2DModel(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192,
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, sample_size=1024,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=None, tokenizer_3=None,
    )


def build_flux_tiny() -> FluxPipeline:
    """Tiny FLUX.1-dev: double- and single-stream transformer blocks over 2x2-packed latents (16 channels), the
    distilled guidance embedding, a CLIP encoder for the pooled vector and a T5 encoder for the sequence."""
    torch.manual_seed(0)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    text_encoder = tiny_clip_text_encoder(len(tokenizer))
    text_encoder_2 = tiny_t5_encoder(len(tokenizer_2), d_model=64)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=pass_through_vae(latent_channels=16, quant_convs=False), text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )


# -- ControlNets ----------------------------------------------------------------------------------------------------
def build_demo_controlnet() -> ControlNetModel:
    """A ControlNet for the demo UNet (see _controlnet_from)."""
    return _controlnet_from(_tiny_unet_from_demo())


def _controlnet_from(unet: UNet2DConditionModel) -> ControlNetModel:
    """A ControlNet whose encoder is copied from `unet`, as ControlNet training starts, with random (not zero)
    weights in the zero convolutions, so a control image visibly changes the images."""
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator("cpu").manual_seed(3)
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.2)
            conv.bias.zero_()
    return controlnet


def _tiny_unet_from_demo() -> UNet2DConditionModel:
    # The same weights as the demo pipeline's UNet: build_demo_pipeline seeds the generator the same way.
    return build_demo_pipeline().unet


@dataclass(frozen=True)
class BuiltinPipeline:
    """A builtin base model: its builder, its family, and its native size where the pipeline cannot tell it (FLUX
    pipelines assume 1024 whatever the transformer)."""

    build: Callable[[], DiffusionPipeline]
    family: FamilyName
    native_size: int | None = None


BUILDERS: dict[str, BuiltinPipeline] = {
    "tiny": BuiltinPipeline(build_demo_pipeline, "sd"),
    "sd15": BuiltinPipeline(build_sd15_preset, "sd"),
    "sdxl-tiny": BuiltinPipeline(build_sdxl_tiny, "sdxl"),
    "sdxl-refiner-tiny": BuiltinPipeline(build_sdxl_refiner_tiny, "sdxl-refiner"),
    "sdxl": BuiltinPipeline(build_sdxl_preset, "sdxl"),
    "sd3-tiny": BuiltinPipeline(build_sd3_tiny, "sd3"),
    "sd3-medium": BuiltinPipeline(build_sd3_medium_preset, "sd3"),
    "flux-tiny": BuiltinPipeline(build_flux_tiny, "flux", native_size=256),
    # Trained, from its committed weights file (models/shapes.py).
    "shapes": BuiltinPipeline(shapes.build_shapes_pipeline, "sd", native_size=shapes.NATIVE_SIZE),
}
# Builtins whose content can change without a BUILD_VERSION bump (a retrained weights file) add a tag to their
# cache folder's name, so a new file never meets an old build.
CACHE_TAGS: dict[str, Callable[[], str]] = {"shapes": shapes.cache_tag}
# Builtin ControlNets: single models (config.json + weights), loaded with ControlNetModel.from_pretrained.
CONTROLNET_BUILDERS: dict[str, Callable[[], ControlNetModel]] = {
    "controlnet-tiny": build_demo_controlnet,
    "sdxl-controlnet-tiny": build_sdxl_controlnet_tiny,
}
CONTROLNET_FAMILIES: dict[str, FamilyName] = {"controlnet-tiny": "sd", "sdxl-controlnet-tiny": "sdxl"}


def builtin_names() -> list[str]:
    return sorted(BUILDERS)


def builtin_controlnet_names() -> list[str]:
    return sorted(CONTROLNET_BUILDERS)


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """Build the builtin model `name` (a pipeline or a ControlNet) into `cache_dir` once and return its folder."""
    builder: Callable[[], DiffusionPipeline | ControlNetModel]
    if name in BUILDERS:
        builder, marker = BUILDERS[name].build, "model_index.json"
    elif name in CONTROLNET_BUILDERS:
        builder, marker = CONTROLNET_BUILDERS[name], "config.json"
    else:
        raise KeyError(name)
    tag = CACHE_TAGS[name]() if name in CACHE_TAGS else ""
    target = cache_dir / "builtin" / f"{name}-v{BUILD_VERSION}{tag}"
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / marker).exists():
            return target
        logger.info("building builtin model %r into %s", name, target)
        scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        try:
            builder().save_pretrained(scratch, safe_serialization=True)
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target
