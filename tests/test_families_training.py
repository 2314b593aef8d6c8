"""Training on SDXL bases: a LoRA trained with `accelerate launch` on the tiny SDXL preset registers itself and the
running server serves it; DreamBooth-LoRA with prior preservation renders its class images with SDXL; bases of
families the scripts do not train are refused before any step."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from models.errors import InvalidRequest
from models.registry.detect import safetensors_keys
from tests.conftest import ROOT, server_env
from tests.training_helpers import FAST_TARGETS, fast_options, instance_images, shapes_dataset
from tests.utils import from_b64, pixels
from training import train_dreambooth_lora, train_lora
from training.config import DreamBoothOptions, LoraOptions
from training.loop import train

CPU_LAUNCH = ["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_an_sdxl_lora_trained_with_accelerate_launch_registers_and_changes_the_served_image(
    client, settings, tmp_path, model_cache
):
    dataset = shapes_dataset(tmp_path / "shapes")
    run_dir = settings.output_dir / "training" / "xl-shapes"
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *CPU_LAUNCH, str(ROOT / "training" / "train_lora.py"),
        "--base", "sdxl-tiny", "--dataset", str(dataset), "--output-dir", str(run_dir), "--resolution", "64",
        "--train-batch-size", "4", "--max-train-steps", "12", "--learning-rate", "1e-2",
        "--unet-target-modules", *FAST_TARGETS, "--train-text-encoder", "--seed", "7", "--register", "xl-shapes",
        "--validation-prompts", "a red square", "--validation-steps", "1000", "--validation-inference-steps", "3",
        "--checkpointing-steps", "1000",
    ]
    environment = server_env(tmp_path, model_cache, OMP_NUM_THREADS="1")
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    weights = run_dir / "pytorch_lora_weights.safetensors"
    components = {key.split(".")[0] for key in safetensors_keys(weights)}
    with safe_open(str(weights), framework="pt") as stream:
        metadata = stream.metadata()
    assert components == {"unet", "text_encoder", "text_encoder_2"}  # SDXL's layout: both text encoders
    assert metadata["sdserve.base_family"] == "sdxl"
    listed = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert (listed["xl-shapes"]["kind"], listed["xl-shapes"]["base"], listed["xl-shapes"]["family"]) == (
        "lora", "sdxl-tiny", "sdxl")

    request = {"prompt": "a red square", "model": "sdxl-tiny", "seed": 7, "steps": 3, "cfg_scale": 7.0,
               "width": 64, "height": 64}
    plain = client.post("/text2img", json=request)
    with_lora = client.post("/text2img", json={**request, "loras": ["xl-shapes"]})
    assert plain.status_code == 200 and with_lora.status_code == 200, with_lora.text
    served = pixels(from_b64(with_lora.json()["images"][0]))
    assert np.abs(served - pixels(from_b64(plain.json()["images"][0]))).mean() > 2.0, "the LoRA changed nothing"
    # The server draws what the run drew at its end (same prompt, seed, steps, size, guidance).
    validation = np.asarray(Image.open(run_dir / "validation" / "step-000012-prompt-0-0.png"), np.float64)
    assert np.abs(served - validation).mean() < 1.0


def test_dreambooth_lora_on_sdxl_renders_class_images_with_sdxl_and_trains(settings, tmp_path):
    options = DreamBoothOptions(**fast_options(
        base="sdxl-tiny", instance_data_dir=instance_images(tmp_path / "subject"), instance_prompt="a photo of sks",
        with_prior_preservation=True, class_prompt="a photo", num_class_images=2, class_generation_steps=2,
        output_dir=tmp_path / "run", max_train_steps=3, train_batch_size=1,
    ))
    result = train(options, train_dreambooth_lora.build_data, settings=settings)
    class_images = sorted((tmp_path / "run" / "class_images").glob("*.png"))
    assert len(class_images) == 2 and Image.open(class_images[0]).size == (64, 64)
    assert result.steps == 3 and all(np.isfinite(result.losses))


@pytest.mark.parametrize("base", ["flux-tiny", "sd3-tiny", "sdxl-refiner-tiny"])
def test_bases_the_scripts_do_not_train_are_refused_naming_the_family(settings, tmp_path, base):
    options = LoraOptions(**fast_options(base=base, dataset=shapes_dataset(tmp_path / "shapes"),
                                         output_dir=tmp_path / "run", max_train_steps=1))
    with pytest.raises(InvalidRequest, match="SDXL") as refusal:
        train(options, train_lora.build_data, settings=settings)
    assert base in str(refusal.value)
    assert not (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()
