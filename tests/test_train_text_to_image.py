"""Full text-to-image training (training/train_text_to_image.py) on CPU, a few steps: from scratch on generated
shapes, what it writes, that the same command gives the same bytes, and that the result registers and serves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from models.packed import read_description, unpack_pipeline
from models.registry import Registry
from training import train_text_to_image
from training.config import TextToImageOptions, parse_options
from training.dataset_files import file_sha256
from training.full_model import MANIFEST_NAME, MODEL_FOLDER, PACKED_NAME
from training.loop import TrainingStopped, train
from training.shapes_data import GENERATOR_VERSION

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def scratch_options(**overrides: object) -> TextToImageOptions:
    options: dict[str, object] = {
        "from_scratch": "shapes-tiny", "shapes_dataset": 64, "seed": 3, "train_batch_size": 4,
        "learning_rate": 1e-3, "max_train_steps": 4, "train_vae_decoder": True, "vae_decoder_images": 2,
        "checkpointing_steps": 1000, "logging_steps": 1,
    }
    options.update(overrides)
    return TextToImageOptions(**options)


def test_a_model_from_scratch_is_written_as_a_folder_a_packed_file_and_a_manifest(settings, tmp_path):
    options = scratch_options(output_dir=tmp_path / "run", register="tiny-shapes")
    result = train(options, train_text_to_image.build_data, settings=settings)

    run = tmp_path / "run"
    assert result.weights == run / PACKED_NAME and result.steps == 4
    manifest = json.loads((run / MANIFEST_NAME).read_text())
    assert manifest["sha256"] == file_sha256(run / PACKED_NAME)
    assert manifest["bytes"] == (run / PACKED_NAME).stat().st_size
    assert manifest["metadata"]["shapes_generator_version"] == str(GENERATOR_VERSION)
    assert manifest["options"]["from_scratch"] == "shapes-tiny" and manifest["seed"] == "3"
    assert json.loads(manifest["metadata"]["trained"]) == ["text_encoder", "unet", "vae"]
    # The packed file holds no run id or time, so two runs of one command can be compared byte for byte.
    _, metadata = read_description(run / PACKED_NAME)
    assert "run_id" not in metadata and "created_at" not in metadata and metadata["steps"] == "4"

    # The folder and the packed file are the same model.
    folder = StableDiffusionPipeline.from_pretrained(run / MODEL_FOLDER)
    packed = unpack_pipeline(run / PACKED_NAME)
    for pipeline in (folder, packed):
        pipeline.set_progress_bar_config(disable=True)
    images = [pipeline("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                       output_type="np").images for pipeline in (folder, packed)]
    assert images[0].shape == (1, 64, 64, 3) and (images[0] == images[1]).all()

    # Registered as a base model the server can serve.
    entry = Registry(settings.registry_path).get("tiny-shapes")
    assert (entry.kind, entry.source, entry.sha256) == ("base", str((run / MODEL_FOLDER).resolve()),
                                                        manifest["sha256"])


@pytest.mark.slow
def test_the_same_command_gives_the_same_bytes_and_another_seed_does_not(settings, tmp_path):
    first = train(scratch_options(output_dir=tmp_path / "a"), train_text_to_image.build_data, settings=settings)
    # Again as a user runs it: the command line, in another process with other string hashing (set orders differ).
    flags = [f"--{key.replace('_', '-')}" + ("" if value is True else f"={value}")
             for key, value in scratch_options().model_dump(exclude_defaults=True).items()]
    environment = {**os.environ, "PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "1",
                   "SDSERVE_REGISTRY_PATH": str(settings.registry_path), "SDSERVE_CACHE_DIR": str(settings.cache_dir)}
    subprocess.run([sys.executable, "training/train_text_to_image.py", *flags, "--output-dir", str(tmp_path / "b")],
                   cwd=ROOT, env=environment, check=True, capture_output=True, timeout=300)
    other = train(scratch_options(output_dir=tmp_path / "c", seed=4), train_text_to_image.build_data,
                  settings=settings)
    assert file_sha256(first.weights) == file_sha256(tmp_path / "b" / PACKED_NAME)
    assert file_sha256(first.weights) != file_sha256(other.weights)


def test_a_stopped_run_resumes_to_the_same_weights(settings, tmp_path):
    straight = train(scratch_options(output_dir=tmp_path / "straight"), train_text_to_image.build_data,
                     settings=settings)
    with pytest.raises(TrainingStopped):
        train(scratch_options(output_dir=tmp_path / "stopped"), train_text_to_image.build_data, settings=settings,
              should_stop=lambda step: step == 2)
    resumed = train(scratch_options(output_dir=tmp_path / "stopped", resume_from_checkpoint="latest"),
                    train_text_to_image.build_data, settings=settings)
    assert resumed.steps == 4
    assert file_sha256(resumed.weights) == file_sha256(straight.weights)


@pytest.mark.parametrize("argv, message", [
    (["--from-scratch", "shapes-tiny", "--shapes-dataset", "10"], "untrained VAE decoder"),
    (["--from-scratch", "shapes-tiny", "--base", "demo", "--shapes-dataset", "10", "--train-vae-decoder"],
     "not both"),
    (["--base", "demo"], "exactly one of dataset"),
])
def test_inconsistent_options_are_refused_before_anything_loads(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_options(TextToImageOptions, argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
