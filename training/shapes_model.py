"""The architecture of the `shapes` model, untrained: what `train_text_to_image.py --from-scratch shapes-tiny` starts
from. Every choice here is made for a 2-core CPU: the whole model must train in well under an hour and draw a
64 px picture in well under a second.

- Tokenizer: CLIP's byte-level BPE, with merges that make each word of the vocabulary (`models.shapes`) one token;
  any other word still tokenizes, letter by letter, so a LoRA can teach a new word.
- Text encoder: a CLIP text transformer, 64 wide, 2 layers, 32 positions (the longest caption is 14 tokens).
- VAE: a 4x pass-through encoder that makes the latent a 16x16 thumbnail of the picture (each latent pixel the mean
  colour of a 4x4 block; the fourth channel is zero), and a decoder trained with the rest (--train-vae-decoder)
  to draw sharp 64 px edges from the thumbnail. A thumbnail latent keeps
  img2img and inpainting meaningful: encoding is exact averaging, so an input picture's colours and layout are
  what the UNet starts from.
- UNet: 16x16 latents, two levels (32 and 64 channels), cross-attention to the prompt at 8x8 and in the middle (no
  self-attention: at this size convolutions see the whole picture), and the pooled prompt added to the timestep
  embedding. Few, small blocks: on a CPU a step costs about as much per module as per multiply.
- Noise schedule: cosine ("squaredcos_cap_v2"), which suits small pictures; the UNet predicts the clean latent
  ("sample"), which gives clean flat colours early in training where predicting the noise leaves grain.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.registry.components import byte_level_vocab, pass_through_vae
from models.shapes import NATIVE_SIZE, vocabulary

ARCHITECTURES = ("shapes-tiny",)
MAX_TOKENS = 32
TEXT_WIDTH = 64
VAE_BLOCKS = 3  # 2**(3 - 1) = 4x downsampling: 64 px pictures, 16x16 latents


def word_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level vocabulary plus BPE merges that join each of `words` into one token.

    Words are added one after the other; each gets the merges that join what the merges so far leave of it, left
    to right. A merge added later ranks below every earlier one, so it never changes how an earlier word splits.
    """
    vocab = byte_level_vocab()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _split(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            parts[:2] = ["".join(pair)]
            vocab.setdefault(parts[0], len(vocab))
    return vocab, merges


def _split(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """How BPE with `ranks` splits `word`: repeatedly join the best-ranked adjacent pair."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = zip(parts, parts[1:], strict=False)
        rank, index = min((ranks.get(pair, len(ranks) + 1), i) for i, pair in enumerate(pairs))
        if rank > len(ranks):
            break
        parts[index : index + 2] = [parts[index] + parts[index + 1]]
    return parts


def build_tokenizer() -> CLIPTokenizer:
    vocab, merges = word_merges(vocabulary())
    with tempfile.TemporaryDirectory() as scratch:
        Path(scratch, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        lines = "".join(f"{left} {right}\n" for left, right in merges)
        Path(scratch, "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(scratch, model_max_length=MAX_TOKENS)
    for word in vocabulary():
        # Two special tokens and the word: anything else means the merges do not do what they promise.
        assert len(tokenizer(word).input_ids) == 3, f"{word!r} is not one token"
    return tokenizer


def untrained_thumbnail_vae() -> AutoencoderKL:
    """The pass-through averaging encoder with a freshly initialised decoder. The pass-through decoder would be a
    poor start: it carries colours next to large constant channels, so the first optimizer step scrambles it."""
    vae = pass_through_vae(blocks=VAE_BLOCKS, average=True, mid_attention=False)
    fresh = AutoencoderKL.from_config(vae.config)
    vae.decoder.load_state_dict(fresh.decoder.state_dict())
    vae.post_quant_conv.load_state_dict(fresh.post_quant_conv.state_dict())
    return vae


def build_untrained_pipeline(architecture: str, seed: int) -> StableDiffusionPipeline:
    """The architecture with freshly drawn weights (the same for the same seed)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {', '.join(ARCHITECTURES)}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_WIDTH, intermediate_size=2 * TEXT_WIDTH, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    vae = untrained_thumbnail_vae()
    latent_size = NATIVE_SIZE // 2 ** (VAE_BLOCKS - 1)
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=2, norm_num_groups=8, only_cross_attention=True,
        # The prompt, pooled, also joins the timestep embedding that every resnet sees: colours reach the whole
        # picture from the first steps of training, not only through cross-attention.
        addition_embed_type="text", addition_embed_type_num_heads=2,
    )
    scheduler = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
