"""Parts the builtin models are made of: tokenizers written in code, small text encoders, the pass-through VAE.

Nothing here downloads anything, and everything is deterministic once the caller has seeded torch.

The pass-through VAE keeps the real AutoencoderKL architecture (8x down/up-sampling, resnets, mid attention) but
its residual branches are silenced and the resamplers copy pixels, so decode(encode(x)) is close to x. That keeps
img2img and inpainting meaningful on a model whose denoiser and text encoders are random. It carries the picture
in the first three latent channels, whatever the latent width (4 for SD 1.x / SDXL, 16 for SD 3.x and FLUX).
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

_VAE_CHANNELS = 16
_VAE_GROUPS = 4
_NORM_CONSTANT = 100.0  # large constant channel that makes GroupNorm nearly linear (see _pass_through_norm)
_SILU_SHIFT = 12.0  # SiLU(x + shift) - shift is almost x
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512


# -- tokenizers -------------------------------------------------------------------------------------------------------
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


def write_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    # No merges: every word splits into byte-level characters, which is all a random text encoder needs.
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=CLIP_MAX_LENGTH)


def clip_tokenizer() -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as scratch:
        return write_clip_tokenizer(Path(scratch))


def t5_tokenizer() -> T5Tokenizer:
    """A T5-style Unigram tokenizer built in code (no sentencepiece model file): T5's special tokens first
    (<pad> 0, </s> 1, <unk> 2), then every printable ASCII character, alone and as a word start ("▁a")."""
    characters = [char for char in string.printable if not char.isspace()]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + char, -4.0) for char in characters] + [(char, -5.0) for char in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


# -- text encoders ----------------------------------------------------------------------------------------------------
def _clip_config(vocab_size: int, hidden_size: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def tiny_clip_text_encoder(vocab_size: int, hidden_size: int = 32) -> CLIPTextModel:
    return CLIPTextModel(_clip_config(vocab_size, hidden_size))


def tiny_clip_text_encoder_with_projection(vocab_size: int, hidden_size: int = 32,
                                           projection_dim: int = 32) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(_clip_config(vocab_size, hidden_size, projection_dim))


def tiny_t5_encoder(vocab_size: int, d_model: int = 64) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=d_model, d_kv=16, d_ff=d_model * 2, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )
    )


# -- the pass-through VAE ---------------------------------------------------------------------------------------------
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


def pass_through_vae(latent_channels: int = 4, quant_convs: bool = True, blocks: int = 4, average: bool = False,
                     mid_attention: bool = True) -> AutoencoderKL:
    """The hand-set autoencoder (see the module docstring). SD 3.x and FLUX VAEs have 16 latent channels and no
    quant convolutions; their pipelines read shift_factor, so it is set (to 0: the latents need no shift).
    It downsamples 2**(blocks - 1) times: each latent pixel is the top-left pixel of its block, or with `average`
    the mean of the block (a smooth thumbnail rather than an aliased one: the shapes model's latents)."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(_VAE_CHANNELS,) * blocks,
        layers_per_block=1,
        norm_num_groups=_VAE_GROUPS,
        sample_size=256,
        scaling_factor=1.0,
        shift_factor=None if quant_convs else 0.0,
        force_upcast=False,
        use_quant_conv=quant_convs,
        use_post_quant_conv=quant_convs,
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
    # conv_out gives the mean (latent_channels), then the log-variance: a very negative log-variance makes
    # sampling exact.
    _read_channels(encoder.conv_out, outputs=3, tap=1)
    with torch.no_grad():
        encoder.conv_out.bias[3:latent_channels] = 0.0
        encoder.conv_out.bias[latent_channels:] = -30.0
    if quant_convs:
        _copy_center(vae.quant_conv, [(c, c) for c in range(2 * latent_channels)], 0, 0)
        _copy_center(vae.post_quant_conv, [(c, c) for c in range(latent_channels)], 0, 0)
    _carry_channels(decoder.conv_in, sources=3, tap=1)
    for block in decoder.up_blocks:
        for up in block.upsamplers or []:
            _copy_center(up.conv, [(c, c) for c in range(_VAE_CHANNELS)], 1, 1)
    _pass_through_norm(decoder.conv_norm_out)
    _read_channels(decoder.conv_out, outputs=3, tap=1)
    return vae
