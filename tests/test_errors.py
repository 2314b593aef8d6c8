"""Bad input gets a clear 4xx, and the next good request still works."""

from __future__ import annotations

import base64

import pytest

from tests.utils import gradient_image, to_b64

GOOD = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "seed": 1}
IMAGE = to_b64(gradient_image(64, 64))


@pytest.mark.parametrize(
    "path, body, status, phrase",
    [
        ("/text2img", {**GOOD, "model": "nope"}, 404, "unknown model 'nope'; registered models: demo"),
        ("/text2img", {**GOOD, "width": 250}, 422, "width: Input should be a multiple of 8"),
        ("/text2img", {**GOOD, "height": 4096}, 422, "height 4096 is over the limit 2048"),
        ("/text2img", {**GOOD, "steps": 500}, 422, "steps 500 is over the limit 150"),
        ("/text2img", {**GOOD, "number_of_images": 50}, 422, "number_of_images 50 is over the limit 8"),
        ("/text2img", {**GOOD, "steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
        ("/text2img", {**GOOD, "scheduler": "bogus"}, 422, "unknown scheduler 'bogus'"),
        ("/text2img", {**GOOD, "output_format": "gif"}, 422, "output_format"),
        ("/text2img", {"steps": 2}, 422, "prompt: is required"),
        ("/img2img", {**GOOD, "image": "%%% not base64"}, 422, "image: is not valid base64"),
        ("/img2img", {**GOOD, "image": base64.b64encode(b"plain text").decode()}, 422, "not an image"),
        ("/img2img", {**GOOD}, 422, "image: is required"),
        ("/img2img", {**GOOD, "image": IMAGE, "strength": 1.5}, 422, "strength"),
        ("/img2img", {**GOOD, "image": IMAGE, "strength": 0.01, "steps": 10}, 422, "runs no denoising step"),
        ("/inpainting", {**GOOD, "image": IMAGE}, 422, "mask_image: is required"),
        ("/inpainting", {**GOOD, "image": IMAGE, "mask_image": "abc"}, 422, "mask_image"),
    ],
)
def test_bad_input_is_a_clear_4xx_and_the_next_request_works(client, path, body, status, phrase):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert phrase in response.json()["detail"]
    assert client.post("/text2img", json=GOOD).status_code == 200


def test_malformed_json_is_422(client):
    response = client.post("/text2img", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422


def test_model_without_offline_weights_is_503_naming_it(client):
    created = client.post("/models", json={"name": "sd-missing", "source": "someone/not-downloaded-model"})
    assert created.status_code == 201, created.text
    response = client.post("/text2img", json={**GOOD, "model": "sd-missing"})
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "sd-missing" in detail and "hf download someone/not-downloaded-model" in detail
    assert "SDSERVE_ALLOW_DOWNLOADS" in detail
    assert client.post("/text2img", json=GOOD).status_code == 200


def test_missing_local_folder_is_503(client, settings):
    """Inside the allowed folders (outside them registration is refused: tests/test_security.py)."""
    missing = settings.registry_path.parent / "nonexistent" / "folder"
    assert client.post("/models", json={"name": "gone", "source": str(missing)}).status_code == 201
    response = client.post("/text2img", json={**GOOD, "model": "gone"})
    assert response.status_code == 503
    assert f"no file or folder at {missing}" in response.json()["detail"]


def test_pickle_checkpoint_refused_without_setting(client, tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\x80\x04not really a pickle")
    client.post("/models", json={"name": "pickled", "source": str(checkpoint)})
    response = client.post("/text2img", json={**GOOD, "model": "pickled"})
    assert response.status_code == 503
    assert "SDSERVE_ALLOW_PICKLE" in response.json()["detail"]
