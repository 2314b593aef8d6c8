"""Pure translation checks of the compatibility surfaces against the fake engine (no pipeline): what each
request becomes in the engine's terms, and the shapes of the answers."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.compat.a1111 import parse_infotext, resolve_checkpoint
from api.compat.openai import UrlSigner
from api.compat.preprocessors import canny
from models.errors import ModelNotFound
from models.registry import RegistryEntry
from tests.fake_engine import FakeEngine
from tests.utils import gradient_image, to_b64


@pytest.fixture
def fake(settings):
    engine = FakeEngine()
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client, engine


def test_a1111_hires_fields_become_the_native_hires(fake):
    client, engine = fake
    body = {"prompt": "x", "width": 128, "height": 96, "enable_hr": True, "hr_resize_x": 200,
            "hr_upscaler": "Latent (nearest-exact)", "hr_second_pass_steps": 7, "denoising_strength": 0.4}
    answer = client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    hires = engine.submitted[-1].hires
    # hr_resize_x alone keeps the aspect ratio; sizes round down to multiples of 8.
    assert (hires.width, hires.height, hires.upscaler, hires.steps, hires.strength) == (200, 144,
                                                                                       "latent-nearest-exact", 7, 0.4)
    bad = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "R-ESRGAN 4x+"})
    assert bad.status_code == 422 and "Lanczos" in bad.json()["detail"]


def test_a1111_controlnet_units_translate(fake):
    client, engine = fake
    unit = {"image": to_b64(gradient_image(32, 32)), "module": "none", "model": "demo-controlnet [abcdef12]",
            "weight": 0.5, "guidance_start": 0.2, "guidance_end": 0.8, "control_mode": "ControlNet is more important"}
    scripts = {"ControlNet": {"args": [unit, {"enabled": False, "model": "x"}, {**unit, "model": "None"}, False]}}
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "alwayson_scripts": scripts}).status_code == 200
    (control,) = engine.submitted[-1].controlnets
    assert (control.name, control.scale, control.guidance_start, control.guidance_end, control.guess_mode) == (
        "demo-controlnet", 0.5, 0.2, 0.8, True)
    prompt_mode = {"controlnet": {"args": [{**unit, "control_mode": 1}]}}
    refused = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "alwayson_scripts": prompt_mode})
    assert refused.status_code == 422 and "Balanced" in refused.json()["detail"]
    no_image = {"controlnet": {"args": [{**unit, "image": ""}]}}
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "alwayson_scripts": no_image}).status_code == 422
    # img2img: a unit without an image steers with the input image, as the extension does.
    init = to_b64(gradient_image(32, 32))
    ok = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [init], "alwayson_scripts": no_image})
    assert ok.status_code == 200 and engine.submitted[-1].controlnets[0].image.size == (32, 32)


def test_native_controlnet_list_and_echo(fake):
    client, engine = fake
    image = to_b64(gradient_image(32, 32))
    body = {"prompt": "x", "controlnet": [{"name": "a", "image": image, "scale": 0.3}, {"name": "b", "image": image}]}
    answer = client.post("/text2img", json=body).json()
    assert [c.name for c in engine.submitted[-1].controlnets] == ["a", "b"]
    assert [c["name"] for c in answer["parameters"]["controlnet"]] == ["a", "b"]
    single = client.post("/text2img", json={"prompt": "x", "controlnet": {"name": "a", "image": image}}).json()
    assert single["parameters"]["controlnet"]["name"] == "a"


def test_a1111_checkpoint_titles_resolve():
    entries = {"demo": RegistryEntry(source="demo:tiny"), "real": RegistryEntry(source="/m/r.safetensors",
                                                                               sha256="6ce0161689" + "0" * 54)}
    assert resolve_checkpoint(entries, "demo.safetensors [0123456789]") == "demo"
    assert resolve_checkpoint(entries, "demo") == "demo"
    assert resolve_checkpoint(entries, "whatever.safetensors [6ce0161689]") == "real"
    with pytest.raises(ModelNotFound):
        resolve_checkpoint(entries, "v1-5-pruned.safetensors")


def test_openai_errors_and_url_signatures(fake):
    client, _ = fake
    missing = client.post("/v1/images/generations", json={"n": 2})
    assert missing.status_code == 400
    assert missing.json() == {"error": {"message": "prompt: is required", "type": "invalid_request_error",
                                        "param": "prompt", "code": None}}
    assert client.get("/v1/nothing-here").json()["error"]["type"] == "invalid_request_error"
    assert "detail" in client.post("/text2img", json={}).json()
    signer = UrlSigner(lifetime_s=60, key=b"k")
    path = signer.path("abc", now=1000)
    signature = path.split("signature=")[1]
    assert signer.check("abc", 1060, signature, now=1059) and not signer.check("abc", 1060, signature, now=1061)
    assert not signer.check("abd", 1060, signature, now=1000)


def test_png_info_parses_infotext_and_canny_draws_edges():
    parsed = parse_infotext('a fox\nNegative prompt: fog\nSteps: 3, Sampler: Euler a, Lora hashes: "a: 1, b: 2", '
                            "Seed: 7")
    assert parsed == {"Prompt": "a fox", "Negative prompt": "fog", "Steps": "3", "Sampler": "Euler a",
                      "Lora hashes": "a: 1, b: 2", "Seed": "7"}
    from PIL import Image, ImageDraw

    square = Image.new("RGB", (32, 32))
    ImageDraw.Draw(square).rectangle((8, 8, 23, 23), fill="white")
    edges = canny(square)
    assert edges.getpixel((8, 16)) == (255, 255, 255) and edges.getpixel((16, 16)) == (0, 0, 0)
