"""LoRAs through the compatibility routes: seed 000's two form LoRAs, seed 003's /load-lora/, A1111 tags."""

from __future__ import annotations

import base64
import json

import pytest

from models.registry import builtins as demo
from tests.lora_factory import random_lora, save_diffusers

FAST = {"prompt": "a red fox", "seed": 11, "steps": 2, "width": 64, "height": 64}


@pytest.fixture
def lora_folders(settings, model_cache):
    """Two LoRA folders inside the registry's folder (an allowed root by default)."""
    model = demo.ensure_builtin("tiny", model_cache)
    root = settings.registry_path.parent / "loras"
    for seed, name in ((1, "one"), (2, "two")):
        save_diffusers(random_lora(model, seed), root / name)
    return root


def native(client, **extra) -> str:
    response = client.post("/text2img", json={**FAST, **extra})
    assert response.status_code == 200, response.text
    return response.json()["images"][0]


def test_seed_000_form_loras_match_native_loras(client, lora_folders):
    form = {"text_prompt": "a red fox", "manual_seed": "11", "inference_steps": "2", "guidance_scale": "7",
            "lora_hugging_face_1": str(lora_folders / "one"), "weight_name_1": "null",
            "lora_hugging_face_2": str(lora_folders / "two"), "weight_name_2": "pytorch_lora_weights.safetensors",
            "cross_attention_kwargs": "0.5"}
    response = client.post("/submit", data=form)
    assert response.status_code == 200, response.text
    expected = native(client, width=None, height=None, cfg_scale=7,
                      loras=[{"name": str(lora_folders / "one"), "scale": 0.5},
                             {"name": str(lora_folders / "two"), "scale": 0.5}])
    assert response.content == base64.b64decode(expected)
    assert response.content != base64.b64decode(native(client, width=None, height=None, cfg_scale=7))


def test_seed_003_load_lora_applies_to_later_generate_image(client, lora_folders):
    form = {"prompt": "a red fox", "height": "64", "width": "64", "num_inference_steps": "2"}
    before = client.post("/generate-image/", data=form).content
    loaded = client.post("/load-lora/", params={"lora_path": str(lora_folders / "one"), "lora_scale": 0.8})
    assert loaded.status_code == 200, loaded.text
    after = client.post("/generate-image/", data=form).content
    assert after != before
    name = loaded.json()["adapter_name"]
    assert client.delete(f"/loras/{name}").status_code == 200
    assert client.post("/generate-image/", data=form).content != after


def test_a1111_inline_lora_tags(client, lora_folders):
    client.post("/models", json={"name": "style-one", "kind": "lora", "source": str(lora_folders / "one")})
    body = {"prompt": "a red fox <lora:style-one:0.7>", "steps": 2, "width": 64, "height": 64, "seed": 11}
    answer = client.post("/sdapi/v1/txt2img", json=body).json()
    assert json.loads(answer["info"])["prompt"] == "a red fox <lora:style-one:0.7>"  # as given, like A1111
    assert answer["images"][0] == native(client, loras=[{"name": "style-one", "scale": 0.7}])
    assert answer["images"][0] != native(client)
