"""Aspect-ratio buckets: the table, each image at its nearest bucket without losing its ends, batches of one bucket,
and a run on a non-square dataset that trains (and resumes exactly) with them."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import CLIPTokenizer

from models.registry import builtins as demo
from tests.training_helpers import MIXED_SIZES, fast_options, mixed_shapes_dataset, shapes_dataset
from training import train_dreambooth_lora, train_lora
from training.config import DreamBoothOptions, LoraOptions
from training.data import (
    BucketBatchSampler,
    Collate,
    ImageCaptionDataset,
    bucket_table,
    image_size,
    load_image,
    nearest_bucket,
)
from training.dataset_files import find_captioned_images
from training.loop import TrainingStopped, train
from training.progress import PROGRESS_FILE, read_progress

# Resolution 64 on the demo model (VAE factor 8, one UNet downsampling): sides are multiples of 16.
EXPECTED = {"wide": (80, 48), "tall": (48, 80), "square": (64, 64)}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_table_keeps_the_area_and_the_step():
    table = bucket_table(512, 64)
    assert (512, 512) in table and (384, 640) in table and (640, 384) in table and (256, 1024) in table
    assert all(width % 64 == 0 and height % 64 == 0 for width, height in table)
    assert all(width * height <= 512 * 512 for width, height in table)
    assert all(256 <= side <= 1024 for size in table for side in size)
    assert bucket_table(64, 16) == [(32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32), (128, 32)]
    assert nearest_bucket((1920, 1080), table) == (640, 384)
    assert nearest_bucket((1000, 1000), table) == (512, 512)
    assert nearest_bucket((300, 1200), table) == (256, 1024)


def test_each_image_fills_its_bucket_and_keeps_both_ends(tmp_path):
    examples = find_captioned_images(mixed_shapes_dataset(tmp_path / "mixed"))
    table = bucket_table(64, 16)
    for example in examples:
        frame = example.image.stem.split("-")[0]
        assert image_size(example.image) == MIXED_SIZES[frame]
        size = nearest_bucket(image_size(example.image), table)
        assert size == EXPECTED[frame]
        pixels, time_ids = load_image(example.image, size, "center", False, random.Random(0))
        assert tuple(pixels.shape) == (3, size[1], size[0])
        assert time_ids[4:].tolist() == [size[1], size[0]]
        # The red marks at both ends of the long side survive (a square crop would cut both away).
        red = (pixels[0] > 0.9) & (pixels[1] < -0.9)
        if frame == "wide":
            assert red[:, 0].any() and red[:, -1].any()
        elif frame == "tall":
            assert red[0, :].any() and red[-1, :].any()


def test_batches_come_from_one_bucket_the_same_way_after_a_restart(tmp_path, model_cache):
    examples = find_captioned_images(mixed_shapes_dataset(tmp_path / "mixed", per_shape=5))
    table = bucket_table(64, 16)
    dataset = ImageCaptionDataset(examples, 64, "center", True, seed=3)
    dataset.use_sizes([nearest_bucket(image_size(example.image), table) for example in examples])
    sampler = BucketBatchSampler(dataset.sizes, images_per_batch=2, seed=3)
    tokenizer = CLIPTokenizer.from_pretrained(demo.ensure_builtin("tiny", model_cache), subfolder="tokenizer")
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(tokenizer))

    assert len(sampler) == 3 * 3  # five images per bucket in batches of two: 2 + 2 + 1, three buckets
    shapes = []
    seen: list[int] = []
    for indices, batch in zip(sampler, loader, strict=True):
        sizes = {dataset.sizes[index] for index in indices}
        assert len(sizes) == 1
        width, height = sizes.pop()
        assert tuple(batch["pixel_values"].shape) == (len(indices), 3, height, width)
        assert batch["time_ids"][:, 4:].tolist() == [[height, width]] * len(indices)
        shapes.append((width, height))
        seen += indices
    assert sorted(seen) == list(range(len(examples)))  # every image once an epoch
    assert Counter(shapes) == {(80, 48): 3, (48, 80): 3, (64, 64): 3}

    # The order is a function of (seed, epoch): the same for a fresh sampler, another for the next epoch.
    again = BucketBatchSampler(dataset.sizes, images_per_batch=2, seed=3)
    assert list(again) == list(sampler)
    again.set_epoch(1)
    assert list(again) != list(sampler)


def test_a_non_square_dataset_trains_with_buckets_and_cached_latents(settings, tmp_path):
    options = LoraOptions(**fast_options(
        dataset=mixed_shapes_dataset(tmp_path / "mixed"), output_dir=tmp_path / "run", max_train_steps=6,
        train_batch_size=2, cache_latents=True, random_flip=True,
    ))
    result = train(options, train_lora.build_data, settings=settings)

    assert result.steps == 6 and all(np.isfinite(result.losses))
    events = read_progress(tmp_path / "run" / PROGRESS_FILE)
    buckets = next(event for event in events if event["event"] == "buckets")
    assert {name: count for name, count in buckets["buckets"].items() if count} == {
        "48x80": 3, "64x64": 3, "80x48": 3}
    sizes = [tuple(event["size"]) for event in events if event["event"] == "step"]
    assert len(sizes) == 6 and set(sizes) <= set(EXPECTED.values()) and len(set(sizes)) > 1
    assert (tmp_path / "run" / "loss.png").is_file()


def test_dreambooth_class_images_join_each_instance_bucket(settings, tmp_path):
    """Prior preservation stacks an instance and a class image in one batch: the class image (square, rendered
    by the base) is trained at the instance's bucket, and cached once per bucket."""
    options = DreamBoothOptions(**fast_options(
        instance_data_dir=mixed_shapes_dataset(tmp_path / "subject", per_shape=1), instance_prompt="a photo of sks",
        with_prior_preservation=True, class_prompt="a photo", num_class_images=2, class_generation_steps=2,
        output_dir=tmp_path / "run", max_train_steps=3, train_batch_size=1, cache_latents=True,
    ))
    result = train(options, train_dreambooth_lora.build_data, settings=settings)
    assert result.steps == 3 and all(np.isfinite(result.losses))
    sizes = {tuple(event["size"]) for event in read_progress(tmp_path / "run" / PROGRESS_FILE)
             if event["event"] == "step"}
    assert sizes <= set(EXPECTED.values()) and len(sizes) > 1


def test_square_datasets_and_the_off_switch_train_squares(settings, tmp_path):
    square = LoraOptions(**fast_options(dataset=shapes_dataset(tmp_path / "shapes"), output_dir=tmp_path / "square",
                                        max_train_steps=2))
    train(square, train_lora.build_data, settings=settings)
    off = LoraOptions(**fast_options(dataset=mixed_shapes_dataset(tmp_path / "mixed"), output_dir=tmp_path / "off",
                                     max_train_steps=2, aspect_ratio_buckets=False))
    train(off, train_lora.build_data, settings=settings)
    for run in ("square", "off"):
        events = read_progress(tmp_path / run / PROGRESS_FILE)
        assert not [event for event in events if event["event"] == "buckets"]
        assert {tuple(event["size"]) for event in events if event["event"] == "step"} == {(64, 64)}


@pytest.mark.slow
def test_a_bucketed_run_stopped_and_resumed_ends_with_the_same_weights(settings, tmp_path):
    common = fast_options(dataset=mixed_shapes_dataset(tmp_path / "mixed"), max_train_steps=6, train_batch_size=2,
                          crop="random", random_flip=True, checkpointing_steps=2)
    straight = train(LoraOptions(output_dir=tmp_path / "straight", **common), train_lora.build_data,
                     settings=settings)
    with pytest.raises(TrainingStopped):
        train(LoraOptions(output_dir=tmp_path / "stopped", **common), train_lora.build_data, settings=settings,
              should_stop=lambda step: step == 4)  # mid-epoch: 5 batches an epoch
    resumed = train(LoraOptions(output_dir=tmp_path / "stopped", resume_from_checkpoint="latest", **common),
                    train_lora.build_data, settings=settings)
    assert resumed.losses == straight.losses[4:]
    expected, actual = load_file(straight.weights), load_file(resumed.weights)
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
