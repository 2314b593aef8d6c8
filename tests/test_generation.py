"""In-process tests of the native generation routes on the demo model."""

from __future__ import annotations

import numpy as np
import pytest

from tests.utils import from_b64, gradient_image, half_mask, pixels, to_b64

FAST = {"steps": 4, "width": 64, "height": 64}


def test_text2img_returns_png_of_requested_size(client):
    body = {"prompt": "a red fox", "width": 256, "height": 128, "steps": 3, "seed": 7}
    response = client.post("/text2img", json=body)
    assert response.status_code == 200, response.text
    body = response.json()
    image = from_b64(body["images"][0])
    assert image.format == "PNG"
    assert image.size == (256, 128)
    assert body["seeds"] == [7]
    assert body["model"] == "demo"
    assert body["parameters"]["width"] == 256 and body["parameters"]["steps"] == 3


def test_same_seed_gives_identical_bytes_and_other_seed_differs(client):
    request = {"prompt": "a lighthouse", "seed": 123, **FAST}
    first = client.post("/text2img", json=request).json()["images"][0]
    again = client.post("/text2img/", json=request).json()["images"][0]
    other = client.post("/text2img", json={**request, "seed": 124}).json()["images"][0]
    assert first == again
    assert first != other


def test_missing_seed_is_drawn_and_reproduces(client):
    drawn = client.post("/text2img", json={"prompt": "a cat", **FAST}).json()
    seed = drawn["seeds"][0]
    redo = client.post("/text2img", json={"prompt": "a cat", "seed": seed, **FAST}).json()
    assert redo["images"][0] == drawn["images"][0]


def test_each_image_of_a_batch_reproduces_alone(client):
    batch = client.post("/text2img", json={"prompt": "boats", "seed": 40, "number_of_images": 3, **FAST}).json()
    assert batch["seeds"] == [40, 41, 42]
    assert len(set(batch["images"])) == 3
    alone = client.post("/text2img", json={"prompt": "boats", "seed": 42, **FAST}).json()
    difference = np.abs(pixels(from_b64(batch["images"][2])) - pixels(from_b64(alone["images"][0])))
    assert difference.mean() < 1.0  # batched matmuls may round differently, never by much


@pytest.mark.parametrize("output_format, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, output_format, pil_format):
    body = client.post("/text2img", json={"prompt": "x", "output_format": output_format, **FAST}).json()
    assert from_b64(body["images"][0]).format == pil_format


def test_img2img_with_small_strength_stays_close_to_input(client):
    source = gradient_image(128, 96)
    response = client.post(
        "/img2img", json={"prompt": "a painting", "image": to_b64(source), "strength": 0.05, "steps": 20, "seed": 3}
    )
    assert response.status_code == 200, response.text
    result = from_b64(response.json()["images"][0])
    assert result.size == (128, 96)
    assert np.abs(pixels(result) - pixels(source)).mean() < 12
    strong = client.post(
        "/img2img", json={"prompt": "a painting", "image": to_b64(source), "strength": 1.0, "steps": 20, "seed": 3}
    ).json()
    assert np.abs(pixels(from_b64(strong["images"][0])) - pixels(source)).mean() > 30


def test_img2img_accepts_data_url_and_resizes_to_width_height(client):
    source = "data:image/jpeg;base64," + to_b64(gradient_image(100, 100), "JPEG")
    response = client.post("/img2img/", json={"prompt": "x", "image": source, "width": 64, "height": 128, "steps": 4})
    assert response.status_code == 200, response.text
    assert from_b64(response.json()["images"][0]).size == (64, 128)


def test_inpainting_keeps_unmasked_pixels(client):
    source = gradient_image(128, 128)
    response = client.post(
        "/inpainting",
        json={"prompt": "a hole", "image": to_b64(source), "mask_image": to_b64(half_mask(128, 128)),
              "steps": 8, "seed": 5},
    )
    assert response.status_code == 200, response.text
    result = pixels(from_b64(response.json()["images"][0]))
    original = pixels(source)
    kept = np.abs(result[:, :60] - original[:, :60]).mean()
    repainted = np.abs(result[:, 68:] - original[:, 68:]).mean()
    assert kept < 2
    assert repainted > 20


def test_inpainting_mask_of_another_size_is_resized(client):
    source = gradient_image(128, 128)
    response = client.post(
        "/inpainting/",
        json={"prompt": "x", "image": to_b64(source), "mask_image": to_b64(half_mask(32, 32)), "steps": 4},
    )
    assert response.status_code == 200, response.text
    result = pixels(from_b64(response.json()["images"][0]))
    assert np.abs(result[:, :60] - pixels(source)[:, :60]).mean() < 2


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "euler_a", "dpmpp_2m", "pndm", "lms", "unipc"])
def test_schedulers_by_name(client, scheduler):
    response = client.post("/text2img", json={"prompt": "x", "scheduler": scheduler, "seed": 1, **FAST})
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["scheduler"] == scheduler


def test_seed_002_request_shape(client):
    """The body seed 002's README sends, with its integer cfg_scale."""
    body = {"prompt": "reinassance painting of a Penguin", "negative_prompt": "out of focus, comic",
            "width": 64, "height": 64, "cfg_scale": 9, "steps": 3, "number_of_images": 2, "seed": 5}
    response = client.post("/text2img/", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 2
