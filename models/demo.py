"""Builders for the models this project makes itself: the tiny `demo` pipeline and real-size presets.

Nothing here downloads anything. Each builder is deterministic (fixed seed), writes a diffusers folder that
`from_pretrained` loads like any checkpoint, and is cached: a second call returns the existing folder.

The demo VAE is a hand-set pass-through autoencoder rather than random noise: its encoder and decoder keep
the real AutoencoderKL architecture (8x down/up-sampling, resnets, mid attention) but their residual branches
are silenced and the resamplers copy pixels, so decode(encode(x)) is close to x. That keeps img2img and
inpainting meaningful on a model whose UNet and text encoder are random.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from filelock import FileLock
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models import shapes

logger = logging.getLogger(__name__)

BUILD_VERSION = 1  # bump when a builder changes, so stale caches are rebuilt
_VAE_CHANNELS = 16
_VAE_GROUPS = 4
_NORM_CONSTANT = 100.0  # large constant channel that makes GroupNorm nearly linear (see _pass_through_norm)
_SILU_SHIFT = 12.0  # SiLU(x + shift) - shift is almost x


def byte_level_vocab() -> dict[str, int]:
    """CLIP's byte-to-unicode table: every byte gets a printable character, so any text tokenizes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    chars = [chr(code) for code in codes]
    tokens = chars + [char + "</w>" for char in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def _write_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    # No merges: every word splits into byte-level characters, which is all a random text encoder needs.
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _tiny_text_encoder(vocab_size: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config)


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


def _copy_center(conv: torch.nn.Conv2d, pairs: list[tuple[int, int]], row: int, col: int) -> None:
    """Make `conv` copy input channel `src` to output channel `dst` from one kernel tap, for each pair."""
    with torch.no_grad():
        conv.weight.zero_()
        if conv.bias is not None:
            conv.bias.zero_()
        for dst, src in pairs:
            conv.weight[dst, src, row, col] = 1.0


def _silence_residual_branches(module: torch.nn.Module) -> None:
    """Zero the last layer of every resnet and attention branch, so each block passes its input through."""
    for name, child in module.named_modules():
        if name.endswith("conv2") or name.endswith("to_out.0"):
            with torch.no_grad():
                child.weight.zero_()
                child.bias.zero_()


def _pass_through_norm(norm: torch.nn.GroupNorm) -> None:
    """Undo GroupNorm's scaling for the [x, -x, C, -C] channel groups laid out by _carry_channels.

    Each group has mean 0 at every pixel and variance close to C^2 / 2, so the normalised x is x / (C / sqrt 2);
    the affine weight multiplies that back and the bias shifts it into SiLU's almost-linear range.
    """
    with torch.no_grad():
        norm.weight.fill_(_NORM_CONSTANT / 2**0.5)
        norm.bias.fill_(_SILU_SHIFT)


def _carry_channels(conv: torch.nn.Conv2d, sources: int, tap: int) -> None:
    """Lay out channel groups [x_i, -x_i, C, -C] for each input channel i, from the kernel's tap."""
    per_group = _VAE_CHANNELS // _VAE_GROUPS
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for group in range(_VAE_GROUPS):
            first = group * per_group
            if group < sources:
                conv.weight[first, group, tap, tap] = 1.0
                conv.weight[first + 1, group, tap, tap] = -1.0
            conv.bias[first + 2] = _NORM_CONSTANT
            conv.bias[first + 3] = -_NORM_CONSTANT


def _read_channels(conv: torch.nn.Conv2d, outputs: int, tap: int, extra_bias: float = 0.0) -> None:
    """Read x_i back out of the groups after norm + SiLU: (SiLU(x + s) - SiLU(-x + s)) / 2 is almost x."""
    per_group = _VAE_CHANNELS // _VAE_GROUPS
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        for channel in range(outputs):
            conv.weight[channel, channel * per_group, tap, tap] = 0.5
            conv.weight[channel, channel * per_group + 1, tap, tap] = -0.5
        conv.bias[outputs:] = extra_bias


def pass_through_vae(blocks: int = 4, average: bool = False, mid_attention: bool = True) -> AutoencoderKL:
    """The pass-through autoencoder, downsampling 2**(blocks - 1) times: each latent pixel is the top-left pixel
    of its block, or with `average` the mean of the block (a smooth thumbnail rather than an aliased one)."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(_VAE_CHANNELS,) * blocks,
        layers_per_block=1,
        norm_num_groups=_VAE_GROUPS,
        sample_size=256,
        scaling_factor=1.0,
        force_upcast=False,
        mid_block_add_attention=mid_attention,
    )
    encoder, decoder = vae.encoder, vae.decoder
    _silence_residual_branches(vae)
    _carry_channels(encoder.conv_in, sources=3, tap=1)
    for block in encoder.down_blocks:
        for down in block.downsamplers or []:
            # Downsample2D pads right/bottom then convolves with stride 2: the top-left tap reads pixel 2i, and
            # the four top-left taps read the 2x2 block starting there.
            pairs = [(c, c) for c in range(_VAE_CHANNELS)]
            _copy_center(down.conv, pairs, 0, 0)
            with torch.no_grad():
                down.conv.bias.zero_()
                if average:
                    down.conv.weight[:, :, :2, :2] = down.conv.weight[:, :, :1, :1] / 4
    _pass_through_norm(encoder.conv_norm_out)
    # conv_out gives mean (4 channels) then log-variance (4): a very negative log-variance makes sampling exact.
    _read_channels(encoder.conv_out, outputs=3, tap=1)
    with torch.no_grad():
        encoder.conv_out.bias[3] = 0.0
        encoder.conv_out.bias[4:] = -30.0
    _copy_center(vae.quant_conv, [(c, c) for c in range(8)], 0, 0)
    _copy_center(vae.post_quant_conv, [(c, c) for c in range(4)], 0, 0)
    _carry_channels(decoder.conv_in, sources=3, tap=1)
    for block in decoder.up_blocks:
        for up in block.upsamplers or []:
            _copy_center(up.conv, [(c, c) for c in range(_VAE_CHANNELS)], 1, 1)
    _pass_through_norm(decoder.conv_norm_out)
    _read_channels(decoder.conv_out, outputs=3, tap=1)
    return vae


def build_demo_pipeline() -> StableDiffusionPipeline:
    """The tiny random-weight pipeline (UNet, text encoder) with the pass-through VAE."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _write_tokenizer(Path(scratch))
    text_encoder = _tiny_text_encoder(len(tokenizer))
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
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = _write_tokenizer(Path(scratch))
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


def build_demo_controlnet() -> ControlNetModel:
    """A ControlNet for the demo UNet: its encoder copied from the UNet, as ControlNet training starts, and random
    (not zero) weights in the zero convolutions, so a control image visibly changes the demo's images."""
    unet = _tiny_unet_from_demo()
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


BUILDERS: dict[str, Callable[[], StableDiffusionPipeline]] = {
    "tiny": build_demo_pipeline,
    "sd15": build_sd15_preset,
    "shapes": shapes.build_shapes_pipeline,  # trained, from its committed weights file (models/shapes.py)
}
# Builtins whose content can change without a BUILD_VERSION bump (a retrained weights file) add a tag to their
# cache folder's name, so a new file never meets an old build.
CACHE_TAGS: dict[str, Callable[[], str]] = {"shapes": shapes.cache_tag}
# Builtin ControlNets: single models (config.json + weights), loaded with ControlNetModel.from_pretrained.
CONTROLNET_BUILDERS: dict[str, Callable[[], ControlNetModel]] = {
    "controlnet-tiny": build_demo_controlnet,
}


def builtin_names() -> list[str]:
    return sorted(BUILDERS)


def builtin_controlnet_names() -> list[str]:
    return sorted(CONTROLNET_BUILDERS)


def ensure_builtin(name: str, cache_dir: Path) -> Path:
    """Build the builtin model `name` (a pipeline or a ControlNet) into `cache_dir` once and return its folder."""
    builder: Callable[[], StableDiffusionPipeline | ControlNetModel]
    if name in BUILDERS:
        builder, marker = BUILDERS[name], "model_index.json"
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
