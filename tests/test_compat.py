"""Clients of the seeds, the OpenAI Images API and AUTOMATIC1111 work unchanged, through the native path."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
from PIL import Image

from tests.utils import from_b64, gradient_image, half_mask, pixels, to_b64


def png_of(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def native(client, **body) -> str:
    return client.post("/text2img", json=body).json()["images"][0]


def test_seed_000_submit_form_returns_the_native_image(client):
    form = {"text_prompt": "a castle", "manual_seed": "11", "inference_steps": "3", "guidance_scale": "7.5",
            "negative_prompt": "null", "lora_hugging_face_1": "null", "lora_hugging_face_2": "null",
            "weight_name_1": "null", "weight_name_2": "null", "modelid": "runwayml/stable-diffusion-v1-5"}
    response = client.post("/submit", data=form)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    expected = native(client, prompt="a castle", seed=11, steps=3, cfg_scale=7.5)
    assert response.content == base64.b64decode(expected)


def test_seed_004_imagine_png_stream_and_json_array(client):
    body = {"prompt": "battle scene", "H": 64, "W": 128, "ddim_steps": 3, "seed": 9}
    streamed = client.post("/imagine", json=body, headers={"Accept": "image/png"})
    assert streamed.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(streamed.content)).size == (128, 64)
    many = client.post("/imagine", json={**body, "n_samples": 2, "n_iter": 2}, headers={"Accept": "application/json"})
    images = many.json()
    assert isinstance(images, list) and len(images) == 4
    batched_first = pixels(Image.open(io.BytesIO(base64.b64decode(images[0]))))
    assert np.abs(batched_first - pixels(Image.open(io.BytesIO(streamed.content)))).mean() < 1.0


def test_seed_003_generate_image_form(client):
    response = client.post("/generate-image/", data={"prompt": "x", "height": "64", "width": "64",
                                                     "num_inference_steps": "2"})
    assert response.status_code == 200
    assert Image.open(io.BytesIO(response.content)).size == (64, 64)
    with_control = client.post("/generate-image/", data={"prompt": "x"},
                               files={"control_image": ("c.png", png_of(gradient_image(64, 64)), "image/png")})
    assert with_control.status_code == 422 and "ControlNet" in with_control.json()["detail"]


def test_openai_generations(client):
    body = {"model": "dall-e-3", "prompt": "a fox", "n": 2, "size": "128x64", "response_format": "b64_json"}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 2 and from_b64(data[0]["b64_json"]).size == (128, 64)
    as_url = client.post("/v1/images/generations", json={**body, "n": 1, "response_format": "url"}).json()
    assert as_url["data"][0]["url"].startswith("http://testserver/v1/images/files/")
    bad = client.post("/v1/images/generations", json={**body, "size": "big"})
    assert bad.status_code == 400 and "WIDTHxHEIGHT" in bad.json()["error"]["message"]  # OpenAI's error shape


def test_openai_edit_with_transparent_mask_keeps_opaque_area(client):
    source = gradient_image(64, 64)
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 64))  # transparent right half = edit there
    response = client.post(
        "/v1/images/edits",
        data={"prompt": "x", "n": "1", "size": "64x64"},
        files={"image": ("i.png", png_of(source), "image/png"), "mask": ("m.png", png_of(mask), "image/png")},
    )
    assert response.status_code == 200, response.text
    result = pixels(from_b64(response.json()["data"][0]["b64_json"]))
    assert np.abs(result[:, :28] - pixels(source)[:, :28]).mean() < 2
    assert np.abs(result[:, 36:] - pixels(source)[:, 36:]).mean() > 10
    not_image = client.post("/v1/images/edits", data={"prompt": "x"}, files={"image": ("i.png", b"nope", "image/png")})
    assert not_image.status_code == 400 and not_image.json()["error"]["param"] == "image"


def test_a1111_txt2img_matches_native_and_reports_seeds(client):
    body = {"prompt": "a ship", "steps": 3, "width": 64, "height": 64, "seed": 21, "batch_size": 2,
            "sampler_name": "Euler a", "cfg_scale": 6}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    info = json.loads(answer["info"])
    assert info["all_seeds"] == [21, 22] and len(answer["images"]) == 2
    expected = native(client, prompt="a ship", steps=3, width=64, height=64, seed=21, cfg_scale=6,
                      scheduler="euler_a", number_of_images=2)
    assert answer["images"][0] == expected


def test_a1111_img2img_and_inpaint(client):
    source = to_b64(gradient_image(128, 128))
    plain = client.post("/sdapi/v1/img2img", json={"init_images": [source], "denoising_strength": 0.05,
                                                   "steps": 20, "width": 128, "height": 128, "prompt": "x"})
    assert plain.status_code == 200, plain.text
    assert np.abs(pixels(from_b64(plain.json()["images"][0])) - pixels(gradient_image(128, 128))).mean() < 12
    source = to_b64(gradient_image(64, 64))
    masked = client.post("/sdapi/v1/img2img", json={"init_images": [source], "mask": to_b64(half_mask(64, 64)),
                                                    "steps": 4, "width": 64, "height": 64, "prompt": "x"})
    result = pixels(from_b64(masked.json()["images"][0]))
    assert np.abs(result[:, :28] - pixels(gradient_image(64, 64))[:, :28]).mean() < 2


def test_a1111_listings(client):
    titles = [model["title"] for model in client.get("/sdapi/v1/sd-models").json()]
    assert "demo" in titles
    assert "Euler a" in [s["name"] for s in client.get("/sdapi/v1/samplers").json()]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "demo"
    assert client.get("/sdapi/v1/loras").json() == []
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0.0 and idle["state"]["job_count"] == 0


def test_a1111_progress_and_interrupt_a_running_job(client):
    results = {}

    def long_request():
        results["response"] = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 150, "width": 512,
                                                                      "height": 512})

    thread = threading.Thread(target=long_request)
    thread.start()
    deadline = time.monotonic() + 30
    progress = {}
    while time.monotonic() < deadline:
        progress = client.get("/sdapi/v1/progress").json()
        if progress["state"]["sampling_step"] > 0:
            break
        time.sleep(0.05)
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    assert client.post("/sdapi/v1/interrupt").json()["interrupted"]
    thread.join(30)
    # As A1111 does: the interrupted request answers with the image as it was when it stopped.
    answer = results["response"]
    assert answer.status_code == 200, answer.text
    info = json.loads(answer.json()["info"])
    assert info["interrupted"] is True and "Interrupted at step" in info["infotexts"][0]
    assert from_b64(answer.json()["images"][0]).size == (512, 512)
    small = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
    assert client.post("/sdapi/v1/txt2img", json=small).status_code == 200
