"""The loop the product promises: train a LoRA, it registers itself, the running server serves it by name.

Needs the `loras` request field of the LoRA-serving work (`loras: [{"name": ..., "scale": ...}]` on /text2img);
until that is merged the server ignores the field and the image-changes assertion fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from tests.training_helpers import fast_options, shapes_dataset
from tests.utils import from_b64, pixels
from training import train_lora
from training.config import LoraOptions
from training.loop import train


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_trained_lora_is_served_by_its_registered_name_without_a_restart(client, settings, tmp_path):
    names_before = {model["name"] for model in client.get("/models").json()["models"]}
    assert "served-shapes" not in names_before

    # The server is already running; the training run writes the registry it reads. Its output goes where the
    # scripts put it by default, under the output folder (a folder LoRAs may be served from).
    run_dir = settings.output_dir / "training" / "served-shapes"
    options = LoraOptions(**fast_options(
        dataset=shapes_dataset(tmp_path / "shapes"), output_dir=run_dir, max_train_steps=30,
        register="served-shapes", validation_prompts=["a red square"], validation_steps=1000,
    ))
    result = train(options, train_lora.build_data, settings=settings)
    listed = {model["name"]: model for model in client.get("/models").json()["models"]}
    assert listed["served-shapes"]["kind"] == "lora" and listed["served-shapes"]["created_by"] == result.run_id

    request = {"prompt": "a red square", "seed": 7, "steps": 3, "cfg_scale": 7.0, "width": 64, "height": 64}
    plain = client.post("/text2img", json=request)
    with_lora = client.post("/text2img", json={**request, "loras": [{"name": "served-shapes", "scale": 1.0}]})
    assert plain.status_code == 200 and with_lora.status_code == 200, with_lora.text
    plain_pixels, lora_pixels = pixels(from_b64(plain.json()["images"][0])), pixels(
        from_b64(with_lora.json()["images"][0]))
    assert np.abs(lora_pixels - plain_pixels).mean() > 2.0, "the LoRA did not change the image"
    # The server draws what the trained model drew at the end of training (same prompt, seed, steps, size).
    validation = np.asarray(Image.open(run_dir / "validation" / "step-000030-prompt-0-0.png"), np.float64)
    assert np.abs(lora_pixels - validation).mean() < 1.0
