"""The real `openai` and `webuiapi` clients against a real server process: each call gives what the native route
gives for the same parameters and seed, byte for byte."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
import requests
import webuiapi
from PIL import Image, ImageDraw

from tests.utils import from_b64, gradient_image, to_b64

SMALL = {"width": 64, "height": 64, "steps": 3}


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def native(server, path: str = "/text2img", **body) -> list[str]:
    response = httpx.post(f"{server.url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["images"]


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0)


@pytest.fixture(scope="module")
def webui(server) -> webuiapi.WebUIApi:
    host, port = server.url.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)


# -- OpenAI -----------------------------------------------------------------------------------------------------------
def test_openai_n_10_runs_as_batches_with_the_native_bytes(server, oai):
    """n=10 is over SDSERVE_MAX_IMAGES (8): two jobs, 8 + 2, with the seeds one job would use."""
    answer = oai.images.generate(model="dall-e-3", prompt="a fox", n=10, size="64x64", extra_body={"seed": 40,
                                                                                                     "steps": 3})
    assert len(answer.data) == 10 and answer.size == "64x64"
    first = native(server, prompt="a fox", seed=40, number_of_images=8, **SMALL)
    second = native(server, prompt="a fox", seed=48, number_of_images=2, **SMALL)
    assert [item.b64_json for item in answer.data] == first + second


def test_openai_url_is_a_link_requests_can_open(server, oai):
    answer = oai.images.generate(prompt="a fox", size="64x64", response_format="url", extra_body={"seed": 40,
                                                                                                   "steps": 3})
    url = answer.data[0].url
    assert url.startswith(server.url + "/v1/images/files/")
    fetched = requests.get(url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    expected = from_b64(native(server, prompt="a fox", seed=40, **SMALL)[0])
    assert Image.open(io.BytesIO(fetched.content)).tobytes() == expected.tobytes()
    forged = requests.get(url.replace("signature=", "signature=0"), timeout=30)
    assert forged.status_code == 404 and "expired" in forged.json()["error"]["message"]


def test_openai_errors_reach_the_sdk_in_openai_shape(oai, server):
    with pytest.raises(openai.BadRequestError) as bad_size:
        oai.images.generate(prompt="a fox", size="big")
    assert "WIDTHxHEIGHT" in bad_size.value.message and bad_size.value.type == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as unknown:
        oai.images.generate(prompt="a fox", model="no-such-model")
    assert unknown.value.code == "model_not_found" and "demo" in unknown.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        oai.images.generate(prompt="a fox", n=11)
    assert too_many.value.param == "n"
    # The native routes keep their own shape.
    assert "detail" in httpx.post(f"{server.url}/text2img", json={"prompt": "x", "width": 3}).json()


def test_openai_models_variations_and_several_images_to_edit(server, oai):
    assert "demo" in [model.id for model in oai.models.list().data]
    assert oai.models.retrieve("demo").owned_by == "sdserve"
    varied = oai.images.create_variation(image=png(gradient_image(64, 64)), n=2, size="64x64")
    assert len(varied.data) == 2 and from_b64(varied.data[0].b64_json).size == (64, 64)
    with pytest.raises(openai.BadRequestError) as several:
        oai.images.edit(image=[png(gradient_image(64, 64)), png(gradient_image(64, 64))], prompt="x")
    assert "one image per request" in several.value.message
    one = oai.images.edit(image=png(gradient_image(64, 64)), prompt="x", size="64x64")
    assert from_b64(one.data[0].b64_json).size == (64, 64)


# -- AUTOMATIC1111 (webuiapi) ------------------------------------------------------------------------------------------
def test_webuiapi_txt2img_matches_native_and_info_has_infotexts(server, webui):
    result = webui.txt2img(prompt="a ship", negative_prompt="fog", seed=21, width=64, height=64, cfg_scale=6)
    expected = native(server, prompt="a ship", negative_prompt="fog", seed=21, cfg_scale=6, scheduler="euler_a",
                      **SMALL)
    assert png(result.image) == base64.b64decode(expected[0])
    assert result.info["prompt"] == "a ship" and result.info["all_seeds"] == [21]
    assert result.info["infotexts"][0].startswith("a ship\nNegative prompt: fog\nSteps: 3, Sampler: Euler a")


def test_webuiapi_hires_fix_is_first_pass_upscale_second_pass(server, webui):
    result = webui.txt2img(prompt="a ship", seed=5, width=64, height=64, enable_hr=True, hr_scale=2,
                           hr_upscaler=webuiapi.HiResUpscaler.Latent, hr_second_pass_steps=4, denoising_strength=0.6)
    assert result.image.size == (128, 128)
    expected = native(server, prompt="a ship", seed=5, scheduler="euler_a", **SMALL,
                      hires={"scale": 2, "upscaler": "latent", "steps": 4, "strength": 0.6})
    assert png(result.image) == base64.b64decode(expected[0])
    assert "Hires upscaler: Latent" in result.info["infotexts"][0]
    lanczos = webui.txt2img(prompt="a ship", seed=5, width=64, height=64, enable_hr=True, hr_resize_x=96,
                            hr_upscaler=webuiapi.HiResUpscaler.Lanczos)
    assert lanczos.image.size == (96, 96)


def test_webuiapi_controlnet_unit_with_canny(server, webui):
    assert webui.controlnet_version() == 2
    assert "demo-controlnet" in webui.controlnet_model_list()
    assert {"none", "canny"} <= set(webui.controlnet_module_list())
    picture = gradient_image(64, 64)
    ImageDraw.Draw(picture).rectangle((16, 16, 47, 40), fill="white")
    unit = webuiapi.ControlNetUnit(image=picture, module="canny", model="demo-controlnet [0123abcd]", weight=0.8,
                                   guidance_start=0.1, guidance_end=0.9, threshold_a=20, threshold_b=60)
    # A dict of our own: webuiapi adds the units to its default `alwayson_scripts` dict, which later calls share.
    result = webui.txt2img(prompt="a ship", seed=5, width=64, height=64, controlnet_units=[unit],
                           alwayson_scripts={})
    edges = to_b64(webui.controlnet_detect([picture], module="canny", threshold_a=20, threshold_b=60).image)
    assert 0 < np.asarray(from_b64(edges).convert("L")).mean() < 128  # white edges on black
    expected = native(server, prompt="a ship", seed=5, scheduler="euler_a", **SMALL, controlnet={
        "name": "demo-controlnet", "image": edges, "scale": 0.8, "guidance_start": 0.1, "guidance_end": 0.9})
    assert png(result.image) == base64.b64decode(expected[0])
    state = httpx.get(f"{server.url}/pipeline-state/").json()  # seed 003: the last run had a ControlNet
    assert state["controlnet_attached"] is True and state["controlnets"] == ["demo-controlnet"]
    plain = native(server, prompt="a ship", seed=5, scheduler="euler_a", **SMALL)
    assert expected[0] != plain[0]
    assert httpx.get(f"{server.url}/pipeline-state/").json()["controlnet_attached"] is False


def test_webuiapi_switches_the_checkpoint(server, webui):
    registered = httpx.post(f"{server.url}/models", json={"name": "other", "kind": "base", "source": "demo:tiny"})
    assert registered.status_code in (200, 201), registered.text
    webui.util_set_model("other")
    assert webui.util_get_current_model() == "other"
    assert webui.txt2img(prompt="x", seed=1, width=64, height=64).info["sd_model_name"] == "other"
    webui.set_options({"sd_model_checkpoint": "demo.safetensors [0123456789]"})  # A1111's title form
    assert webui.get_options()["sd_model_checkpoint"] == "demo"
    assert webui.txt2img(prompt="x", seed=1, width=64, height=64).info["sd_model_name"] == "demo"
    unknown = requests.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}, timeout=30)
    assert unknown.status_code == 404 and webui.get_options()["sd_model_checkpoint"] == "demo"


def test_webuiapi_listings_in_a1111_shapes(server, webui):
    assert [s["name"] for s in webui.get_schedulers()] == ["automatic", "karras"]
    assert {"Lanczos", "Nearest"} <= {u["name"] for u in webui.get_upscalers()}
    assert webui.get_sd_vae() == [] and webui.get_prompt_styles() == []
    assert webui.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert webui.get_memory()["ram"]["total"] > 0
    assert webui.skip() == {"skipped": None}
    saved = httpx.get(f"{server.url}/images", params={"limit": 1}).json()["images"][0]
    picture = Image.open(io.BytesIO(httpx.get(f"{server.url}/images/{saved['id']}").content))
    info = webui.png_info(picture)
    assert info.info.startswith(saved["prompt"]) and info.json["parameters"]["Seed"] == str(saved["seed"])


def test_a1111_n_iter_runs_one_job_per_iteration(server, webui):
    result = webui.txt2img(prompt="a ship", seed=30, width=64, height=64, batch_size=2, n_iter=5)
    assert len(result.images) == 10 and result.info["all_seeds"] == list(range(30, 40))
    expected = native(server, prompt="a ship", seed=32, number_of_images=2, scheduler="euler_a", **SMALL)
    assert [image.tobytes() for image in result.images[2:4]] == [from_b64(text).tobytes() for text in expected]


# -- plain HTTP: the seeds ---------------------------------------------------------------------------------------------
def test_seed_002_generate_is_text2img(server):
    body = {"prompt": "a penguin", "negative_prompt": "comic", "cfg_scale": 9, "number_of_images": 1, "seed": 5,
            **SMALL}
    answer = httpx.post(f"{server.url}/generate/", json=body, timeout=120).json()
    assert answer["images"] == native(server, **body)


def test_seed_004_imagine_readme_example_and_init_image(server):
    body = {"prompt": "battle scene", "H": 64, "W": 64, "ddim_steps": 3, "n_samples": 2, "n_iter": 5, "seed": 9}
    images = httpx.post(f"{server.url}/imagine", json=body, headers={"Accept": "application/json"},
                        timeout=300).json()
    assert len(images) == 10  # over SDSERVE_MAX_IMAGES (8): each iteration is its own batch of 2
    assert images[2:4] == native(server, prompt="battle scene", seed=11, number_of_images=2, cfg_scale=7.5, **SMALL)
    init = to_b64(gradient_image(64, 64))
    from_init = httpx.post(f"{server.url}/imagine", json={"prompt": "x", "ddim_steps": 4, "seed": 3,
                                                           "init_img": init, "strength": 0.5}, timeout=120).json()
    assert from_init == native(server, "/img2img", prompt="x", steps=4, seed=3, cfg_scale=7.5, image=init,
                               strength=0.5)


def test_seed_001_random_diffusion(server):
    route = f"{server.url}/api/image_model_domain/v1/random_diffusion/1"
    body = {"prompt_list": ["cat dancing in rain", "a red square", "a boat"], "model_list": ["demo", "other"],
            "seed": 7, "steps": 3, "width": 64, "height": 64, "number_of_images": 4}
    answer = httpx.post(f"{route}/initialize_diffusion/", json=body, timeout=300).json()
    assert answer["status"] == "succeeded" and answer["number_of_images"] == 4
    assert answer["total_time_taken"] > 0 and answer["average_time_per_image"] > 0 and answer["memory_usage_mb"] > 0
    again = httpx.post(f"{route}/initialize_diffusion/", json=body, timeout=300).json()
    assert [(o["prompt"], o["model"]) for o in again["outputs"]] == [(o["prompt"], o["model"])
                                                                     for o in answer["outputs"]]
    for output in answer["outputs"]:
        assert output["prompt"] in body["prompt_list"] and output["model"] in body["model_list"]
        image = native(server, prompt=output["prompt"], model=output["model"], seed=output["seed"], **SMALL)[0]
        assert output["image"] == image
        saved = httpx.get(f"{server.url}/images/{output['image_ids'][0]}")
        assert saved.status_code == 200
        assert json.loads(Image.open(io.BytesIO(saved.content)).text["sdserve"])["request"]["prompt"] == \
            output["prompt"]
    # Input images: one img2img output each; and a run followed without waiting for it.
    queued = httpx.post(f"{route}/initialize_diffusion/", timeout=60, json={
        "prompt_list": ["x"], "model_list": ["demo"], "image_list": [to_b64(gradient_image(64, 64))] * 2,
        "steps": 3, "wait": False})
    assert queued.status_code == 202 and queued.headers["location"].endswith(queued.json()["run_id"])
    for _ in range(600):
        run = httpx.get(f"{server.url}{queued.headers['location']}").json()
        if run["status"] != "running":
            break
    assert run["status"] == "succeeded" and [o["input_image"] for o in run["outputs"]] == [0, 1]
    first = run["outputs"][0]
    assert first["image"] == native(server, "/img2img", prompt="x", seed=first["seed"], steps=3,
                                    image=to_b64(gradient_image(64, 64)))[0]
