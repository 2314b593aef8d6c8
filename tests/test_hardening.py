"""Issue 10, points 2 and 4-9, on the real engine (demo model): bounded input, sizes resolved then checked,
confined registry sources, a registry that never loses its models, no 5xx from bad input, dataset symlinks."""

from __future__ import annotations

import base64
import io
import os

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from models.errors import RegistryUnavailable
from models.registry import Registry, RegistryEntry
from models.settings import Settings
from tests.utils import gradient_image, to_b64
from training.dataset_files import DatasetError, find_captioned_images, find_images

SMALL = {"prompt": "x", "steps": 2, "seed": 1}
IMAGE = to_b64(gradient_image(64, 64))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if image.mode != "LAB" else "TIFF")
    return buffer.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


# -- 2. bounded requests ------------------------------------------------------------------------------------------
def test_a_body_over_the_limit_is_413_before_anything_runs(settings, tmp_path):
    limited = settings.model_copy(update={"max_body_bytes": 64 * 1024})
    with TestClient(create_app(limited)) as client:
        big = {**SMALL, "negative_prompt": "n" * 70_000}
        response = client.post("/text2img", json=big)
        assert response.status_code == 413 and "SDSERVE_MAX_BODY_BYTES" in response.json()["detail"]

        def chunks():  # no Content-Length: counted as it streams in
            for _ in range(40):
                yield b" " * 4096

        streamed = client.post("/text2img", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert client.get("/jobs").json()["total"] == 0


def test_image_lists_are_counted_and_pixels_budgeted_before_decoding(client):
    """40 copies of a small-compressed 4096x4096 PNG took the server from 1.2 to 3.8 GiB."""
    big = b64(Image.new("RGB", (4096, 4096)))
    assert len(big) < 200_000  # a few hundred kilobytes that decode to 48 MiB each
    many = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [IMAGE] * 5, "width": 64, "height": 64})
    assert many.status_code == 422 and "SDSERVE_MAX_INPUT_IMAGES" in many.json()["detail"]
    budget = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [big, big], "width": 64,
                                                    "height": 64})
    assert budget.status_code == 422 and "SDSERVE_MAX_INPUT_PIXELS" in budget.json()["detail"]
    # The budget is per request: image and mask together, native route.
    both = client.post("/inpainting", json={**SMALL, "image": big, "mask_image": big, "width": 64, "height": 64})
    assert both.status_code == 422 and "SDSERVE_MAX_INPUT_PIXELS" in both.json()["detail"]
    # Within the budget it works.
    ok = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [IMAGE, IMAGE], "width": 64, "height": 64})
    assert ok.status_code == 200, ok.text


# -- 4. sizes are checked once resolved from the input image -------------------------------------------------------
TALL = b64(gradient_image(64, 4096))
TINY = b64(Image.new("RGB", (1, 1), (200, 10, 10)))


@pytest.mark.parametrize("path, body", [
    ("/img2img", {**SMALL, "image": TALL, "width": 64}),
    ("/inpainting", {**SMALL, "image": TALL, "mask_image": TALL, "width": 64}),
    ("/jobs", {**SMALL, "task": "img2img", "image": TALL, "width": 64}),
])
def test_one_side_from_a_tall_image_is_over_the_limit(client, path, body):
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert "height 4096 (taken from the input image" in response.json()["detail"]


def test_edits_without_size_take_the_image_size_and_check_it(client):
    files = {"image": ("tall.png", base64.b64decode(TALL), "image/png")}
    response = client.post("/v1/images/edits", files=files, data={"prompt": "x"})
    assert response.status_code == 400 and "over the limit 2048" in response.json()["error"]["message"]


def test_a_one_pixel_image_is_under_the_minimum(client):
    response = client.post("/img2img", json={**SMALL, "image": TINY})
    assert response.status_code == 422 and "under the minimum 64" in response.json()["detail"]
    resized = client.post("/img2img", json={**SMALL, "image": TINY, "width": 64, "height": 64})
    assert resized.status_code == 200
    image = Image.open(io.BytesIO(base64.b64decode(resized.json()["images"][0])))
    assert image.size == (64, 64)


# -- 5. registry sources are confined, with one message -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["base", "controlnet", "dreambooth", "lora"])
def test_registered_sources_outside_the_roots_are_refused_alike(client, kind, tmp_path):
    details = set()
    for source in ("/root", "/nonexistent", "/etc/shadow", "/etc", "../../etc/passwd", str(tmp_path.parent)):
        response = client.post("/models", json={"name": "probe", "kind": kind, "source": source})
        assert response.status_code == 403, (source, response.text)
        details.add(response.json()["detail"])
    assert len(details) == 1, details  # says nothing about what exists
    assert "probe" not in client.get("/models").text


def test_config_is_confined_too_and_inside_the_roots_registration_works(client, settings):
    outside = client.post("/models", json={"name": "single", "source": str(settings.registry_path.parent / "m.st"),
                                           "config": "/etc"})
    assert outside.status_code == 403
    inside = settings.output_dir / "models" / "mine"
    assert client.post("/models", json={"name": "mine", "source": str(inside)}).status_code == 201
    assert client.post("/models", json={"name": "hub", "source": "someone/some-model"}).status_code == 201


def test_registry_fields_are_bounded(client):
    response = client.post("/models", json={"name": "long", "source": "demo:tiny", "description": "d" * 5_000_000})
    assert response.status_code == 422 and "description" in response.json()["detail"]
    words = client.post("/models", json={"name": "w", "source": "demo:tiny", "trigger_words": ["x" * 300]})
    assert words.status_code == 422


# -- 6. the registry file ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("broken", ["models:\n  demo: [unclosed\n", "models:\n  bad: {kind: nonsense, source: x}\n",
                                    "", "just a string\n"])
def test_writes_to_a_broken_registry_are_503_and_leave_the_file(client, settings, broken):
    path = settings.registry_path
    path.write_text(broken)
    os.utime(path, ns=(3, 3))
    for method, url, body in (("POST", "/models", {"name": "new", "source": "demo:tiny"}),
                              ("DELETE", "/models/sd15-random", None), ("POST", "/models/reload", None)):
        response = client.request(method, url, json=body)
        assert response.status_code == 503, (url, response.text)
        assert str(path) in response.json()["detail"]
        assert path.read_text() == broken
    # The last good entries keep serving.
    assert client.post("/text2img", json={**SMALL, "width": 64, "height": 64}).status_code == 200


def test_writes_while_the_registry_file_is_missing_are_503(client, settings):
    settings.registry_path.unlink()
    response = client.post("/models", json={"name": "new", "source": "demo:tiny"})
    assert response.status_code == 503 and "missing" in response.json()["detail"]
    assert not settings.registry_path.exists()


def test_an_empty_registry_file_stops_the_start_but_a_missing_one_is_created(tmp_path):
    path = tmp_path / "registry.yaml"
    assert "demo" in Registry(path).names()  # first start: the packaged registry
    path.write_text("")
    with pytest.raises(RegistryUnavailable, match="empty"):
        Registry(path)
    path.write_text("# only comments\n")
    with pytest.raises(RegistryUnavailable, match="empty"):
        Registry(path)
    path.write_text("models: {}\n")  # an empty registry on purpose
    registry = Registry(path)
    assert registry.names() == []
    registry.register("x", RegistryEntry(source="demo:tiny"))
    assert registry.names() == ["x"]


def test_an_empty_registry_file_fails_the_server_start(settings):
    settings.registry_path.write_text("")
    with pytest.raises(RegistryUnavailable), TestClient(create_app(settings)):
        pass


def test_the_default_model_cannot_be_deleted_and_health_says_when_it_is_gone(client, settings):
    response = client.delete("/models/demo")
    assert response.status_code == 409 and "SDSERVE_DEFAULT_MODEL" in response.json()["detail"]
    assert client.get("/models/demo").status_code == 200
    path = settings.registry_path
    path.write_text(path.read_text().replace("  demo:\n", "  renamed:\n", 1))
    os.utime(path, ns=(4, 4))
    health = client.get("/health")
    assert health.status_code == 503
    assert health.json()["status"] == "degraded" and "'demo' is not in the registry" in health.json()["error"]


# -- 7. no 5xx from bad input ----------------------------------------------------------------------------------------
def test_huge_offsets_are_422(client):
    for path in ("/jobs", "/images"):
        response = client.get(path, params={"offset": 2**63})
        assert response.status_code == 422, response.text
        assert client.get(path, params={"offset": 10**9}).status_code == 200


LAB = Image.new("LAB", (64, 64), (50, 0, 0))


def test_lab_masks_are_converted(client):
    lab = b64(LAB)
    native = client.post("/inpainting", json={**SMALL, "image": IMAGE, "mask_image": lab})
    assert native.status_code == 200, native.text
    a1111 = client.post("/sdapi/v1/img2img", json={**SMALL, "init_images": [IMAGE], "mask": lab, "width": 64,
                                                   "height": 64})
    assert a1111.status_code == 200, a1111.text
    files = {"image": ("a.png", base64.b64decode(IMAGE), "image/png"), "mask": ("m.tiff", png_bytes(LAB))}
    edits = client.post("/v1/images/edits", files=files, data={"prompt": "x", "size": "64x64"})
    assert edits.status_code == 200, edits.text


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("F", "TIFF"), ("CMYK", "JPEG"), ("YCbCr", "JPEG")])
def test_other_image_modes_are_converted(client, mode, fmt):
    buffer = io.BytesIO()
    Image.new(mode, (64, 64)).save(buffer, format=fmt)
    text = base64.b64encode(buffer.getvalue()).decode()
    response = client.post("/inpainting", json={**SMALL, "image": text, "mask_image": text})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("value", [5, ["demo"], {"a": 1}, True])
def test_a_non_string_a1111_checkpoint_is_422(client, value):
    body = {**SMALL, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": value}}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 422 and "sd_model_checkpoint" in response.json()["detail"]


@pytest.mark.parametrize("lora", ["/tmp/a\x00b.safetensors", {"name": "style", "weight_name": "w\x00.safetensors"},
                                  "bad\x07name"])
def test_control_characters_in_lora_paths_are_422(client, lora):
    response = client.post("/text2img", json={**SMALL, "width": 64, "height": 64, "loras": [lora]})
    assert response.status_code == 422, response.text
    assert client.post("/load-lora/", json={"lora_path": "/tmp/a\x00b"}).status_code == 422


def test_nul_in_a_controlnet_path_is_422(client):
    response = client.post("/load-controlnet/", json={"controlnet_path": "/tmp/x\x00y"})
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("field", ["model", "scheduler", "prompt", "negative_prompt"])
def test_lone_surrogates_are_422_and_nothing_is_left_unrecorded(client, field):
    body = '{"task": "text2img", "prompt": "x", "steps": 2, "width": 64, "height": 64, "FIELD": "a\\ud800"}'
    raw = body.replace("FIELD", field)
    response = client.post("/jobs", content=raw.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    a1111 = ('{"prompt": "x", "steps": 2, "width": 64, "height": 64, '
             '"override_settings": {"sd_model_checkpoint": "a\\ud800"}}')
    response = client.post("/sdapi/v1/txt2img", content=a1111.encode(), headers={"content-type": "application/json"})
    assert response.status_code in (404, 422), response.text
    for job in client.get("/jobs").json()["jobs"]:
        assert client.get(f"/jobs/{job['id']}").status_code == 200


# -- 8. symlinks in every dataset layout -----------------------------------------------------------------------------
def test_caption_file_layout_refuses_symlinks_leading_out(tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    gradient_image(32, 32).save(secret / "private.png")
    (secret / "private.txt").write_text("a private caption")
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    gradient_image(32, 32).save(dataset / "ok.png")
    (dataset / "ok.txt").write_text("fine")
    assert len(find_captioned_images(dataset)) == 1
    (dataset / "leak.png").symlink_to(secret / "private.png")
    (dataset / "leak.txt").write_text("caption")
    with pytest.raises(DatasetError, match="points outside the dataset folder"):
        find_captioned_images(dataset)
    (dataset / "leak.png").unlink()
    gradient_image(32, 32).save(dataset / "leak.png")
    (dataset / "leak.txt").unlink()
    (dataset / "leak.txt").symlink_to(secret / "private.txt")  # the caption may not be read from outside either
    with pytest.raises(DatasetError, match="points outside the dataset folder"):
        find_captioned_images(dataset)


def test_image_folders_refuse_symlinks_leading_out(tmp_path):
    outside = tmp_path / "elsewhere.png"
    gradient_image(32, 32).save(outside)
    folder = tmp_path / "instance"
    folder.mkdir()
    (folder / "dog.png").symlink_to(outside)
    with pytest.raises(DatasetError, match="points outside"):
        find_images(folder, "instance_data_dir")
    (folder / "dog.png").unlink()
    gradient_image(32, 32).save(folder / "real.png")
    (folder / "same.png").symlink_to(folder / "real.png")  # inside the folder: fine
    assert [path.name for path in find_images(folder)] == ["real.png", "real.png"]


def test_settings_reject_malformed_keys_and_origins():
    with pytest.raises(ValueError):
        Settings(api_keys='["has space"]')
    with pytest.raises(ValueError):
        Settings(allowed_origins="https://ok.example/path")
    assert Settings(allowed_origins="https://A.example:8443").allowed_origins == ["https://a.example:8443"]


def test_settings_accept_json_lists_and_commas():
    settings = Settings(api_keys='["one-key-123", "two-key-456"]', admin_keys="a-key-1, b-key-2")
    assert [key.get_secret_value() for key in settings.api_keys] == ["one-key-123", "two-key-456"]
    assert [key.get_secret_value() for key in settings.admin_keys] == ["a-key-1", "b-key-2"]
