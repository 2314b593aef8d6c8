"""SDXL (with its refiner), SD 3.x and FLUX through the real engine, on the tiny builtin presets: every task, each
family's own fields (and the 422s where they do not apply), schedulers, previews, the result cache, PNG parameters,
recorded jobs, LoRAs, registry round trips, ControlNet for SDXL and single-file SDXL checkpoints."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from models.engine.families import native_size
from models.families import family_of_checkpoint_keys
from models.registry import builtins
from models.settings import Settings
from tests.checkpoints import sdxl_single_file
from tests.conftest import wait_ready
from tests.family_loras import family_lora, save_diffusers, save_kohya_flux, save_kohya_sdxl
from tests.utils import StepGate, from_b64, gradient_image, half_mask, parse_sse, pixels, to_b64, wait_for

FAMILY_OF = {"sdxl-tiny": "sdxl", "sd3-tiny": "sd3", "flux-tiny": "flux"}
DEFAULT_GUIDANCE = {"sdxl-tiny": 5.0, "sd3-tiny": 7.0, "flux-tiny": 3.5}
FAST = {"prompt": "a red fox", "seed": 11, "steps": 2, "width": 64, "height": 64}
IMAGE = gradient_image(64, 64)


def family_settings(folder: Path, model_cache: Path, **overrides: object) -> Settings:
    return Settings(registry_path=folder / "registry.yaml", cache_dir=model_cache, output_dir=folder / "outputs",
                    data_dir=folder / "data", device="cpu", max_loaded_models=4, preview_every=1, default_model="demo",
                    **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def client(folder: Path, model_cache: Path) -> Iterator[TestClient]:
    """One server for the module: the tiny presets load once (a second each) and stay loaded."""
    with TestClient(create_app(family_settings(folder, model_cache))) as test_client:
        wait_ready(test_client)
        yield test_client


def generate(client: TestClient, route: str = "text2img", **fields: object) -> dict:
    answer = client.post(f"/{route}", json=FAST | fields)
    assert answer.status_code == 200, answer.text
    return answer.json()


def first_image(answer: dict) -> np.ndarray:
    return pixels(from_b64(answer["images"][0]))


def differ(a: dict, b: dict) -> float:
    return float(np.abs(first_image(a) - first_image(b)).mean())


def refused(client: TestClient, route: str = "text2img", **fields: object) -> str:
    answer = client.post(f"/{route}", json=FAST | fields)
    assert answer.status_code == 422, answer.text
    return answer.json()["detail"]


# -- the registry knows each family ---------------------------------------------------------------------------------
def test_models_and_a1111_sd_models_show_each_family(client):
    listed = {model["name"]: model["family"] for model in client.get("/models").json()["models"]}
    assert {name: listed[name] for name in ("demo", "sdxl-tiny", "sdxl-refiner-tiny", "sd3-tiny", "flux-tiny",
                                            "sdxl-random", "demo-controlnet", "sdxl-controlnet-tiny")} == {
        "demo": "sd", "sdxl-tiny": "sdxl", "sdxl-refiner-tiny": "sdxl-refiner", "sd3-tiny": "sd3",
        "flux-tiny": "flux", "sdxl-random": "sdxl", "demo-controlnet": "sd", "sdxl-controlnet-tiny": "sdxl"}
    assert client.get("/models/flux-tiny").json()["family"] == "flux"
    a1111 = {model["model_name"]: model["family"] for model in client.get("/sdapi/v1/sd-models").json()}
    assert a1111["sdxl-tiny"] == "sdxl" and a1111["sd3-tiny"] == "sd3" and a1111["demo"] == "sd"


def test_native_size_comes_from_the_model_config():
    """SDXL's and SD 3's denoisers say 128 latents (1024 px); FLUX transformers say nothing: their pipelines' 1024."""
    sdxl = SimpleNamespace(unet=SimpleNamespace(config={"sample_size": 128}), vae_scale_factor=8)
    flux = SimpleNamespace(transformer=SimpleNamespace(config={}), default_sample_size=128, vae_scale_factor=8)
    sd15 = SimpleNamespace(unet=SimpleNamespace(config={"sample_size": 64}), vae_scale_factor=8)
    assert (native_size(sdxl), native_size(flux), native_size(sd15)) == (1024, 1024, 512)


# -- every task on every family -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", list(FAMILY_OF))
def test_every_task_runs_on_each_family(client, model):
    native = generate(client, model=model, width=None, height=None)
    assert from_b64(native["images"][0]).size == (256, 256)  # the tiny presets' native size
    parameters = native["parameters"]
    assert (parameters["family"], parameters["cfg_scale"]) == (FAMILY_OF[model], DEFAULT_GUIDANCE[model])

    # img2img sizes the output from the input (SD 3.x and FLUX pipelines would otherwise make 1024x1024)
    picture = gradient_image(96, 64)
    img2img = generate(client, "img2img", model=model, image=to_b64(picture), width=None, height=None, steps=4)
    assert from_b64(img2img["images"][0]).size == (96, 64)
    assert img2img["parameters"]["strength"] == 0.75

    inpainted = generate(client, "inpainting", model=model, image=to_b64(IMAGE), mask_image=to_b64(half_mask(64, 64)))
    result = first_image(inpainted)
    assert np.array_equal(result[:, :32], pixels(IMAGE)[:, :32]), "the kept half changed"
    assert np.abs(result[:, 32:] - pixels(IMAGE)[:, 32:]).mean() > 5, "the masked half was not repainted"


# -- each family's own fields ---------------------------------------------------------------------------------------
def test_sdxl_second_prompt_and_size_conditioning_reach_the_model(client):
    plain = generate(client, model="sdxl-tiny")
    second = generate(client, model="sdxl-tiny", prompt_2="a watercolour", negative_prompt_2="blur")
    small = generate(client, model="sdxl-tiny", original_size=[128, 96], target_size=[64, 64],
                     crops_coords_top_left=[16, 8])
    assert differ(plain, second) > 1 and differ(plain, small) > 1
    assert small["parameters"]["family_arguments"] == {
        "original_size": [128, 96], "target_size": [64, 64], "crops_coords_top_left": [16, 8]}
    assert second["parameters"]["family_arguments"] == {"prompt_2": "a watercolour", "negative_prompt_2": "blur"}


def test_sd3_takes_a_prompt_per_encoder(client):
    plain = generate(client, model="sd3-tiny")
    third = generate(client, model="sd3-tiny", prompt_3="a long T5 description", negative_prompt_3="noise")
    assert differ(plain, third) > 1


def test_flux_guidance_is_its_distilled_guidance(client):
    low, high = generate(client, model="flux-tiny", guidance=1.0), generate(client, model="flux-tiny", guidance=6.0)
    assert differ(low, high) > 1
    assert high["parameters"]["cfg_scale"] == 6.0 and high["parameters"]["family_arguments"]["guidance"] == 6.0
    # FLUX has no classifier-free guidance: cfg_scale (diffusers' guidance_scale) sets the same guidance.
    assert generate(client, model="flux-tiny", cfg_scale=6.0)["images"] == high["images"]
    assert generate(client, model="flux-tiny", prompt_2="for T5")["images"] != generate(client, model="flux-tiny")[
        "images"]


@pytest.mark.parametrize(("fields", "words"), [
    ({"model": "demo", "prompt_2": "x"}, ["prompt_2", "'demo'", "Stable Diffusion 1.x"]),
    ({"model": "demo", "original_size": [64, 64]}, ["original_size", "SDXL"]),
    ({"model": "sd3-tiny", "crops_coords_top_left": [0, 0]}, ["crops_coords_top_left", "SD 3.x"]),
    ({"model": "sdxl-tiny", "guidance": 3.5}, ["guidance", "SDXL", "FLUX"]),
    ({"model": "flux-tiny", "negative_prompt": "blur"}, ["negative_prompt", "FLUX", "no negative prompt"]),
    ({"model": "flux-tiny", "negative_prompt_2": "blur"}, ["negative_prompt_2", "FLUX"]),
    ({"model": "flux-tiny", "prompt_3": "x"}, ["prompt_3", "FLUX"]),
    ({"model": "sd3-tiny", "width": 72}, ["width 72", "multiple of 16", "SD 3.x"]),
    ({"model": "flux-tiny", "refiner": "sdxl-refiner-tiny"}, ["refiner", "FLUX"]),
    ({"model": "sdxl-tiny", "refiner_switch_at": 0.7}, ["refiner_switch_at needs a refiner"]),
    ({"model": "sdxl-tiny", "refiner": "demo"}, ["refiner 'demo'", "Stable Diffusion 1.x", "SDXL refiner"]),
    ({"model": "sdxl-tiny", "refiner": "sdxl-tiny"}, ["the base model itself"]),
    ({"model": "sdxl-refiner-tiny"}, ["'sdxl-refiner-tiny'", "does not do text2img", "refiner"]),
    ({"model": "sdxl-refiner-tiny", "loras": ["x"], "image": to_b64(IMAGE)}, ["loras", "SDXL refiner"]),
])
def test_what_a_family_does_not_take_is_refused_naming_the_field_and_family(client, fields, words):
    route = "img2img" if "image" in fields else "text2img"
    detail = refused(client, route, **fields)
    assert all(word in detail for word in words), detail


# -- schedulers -----------------------------------------------------------------------------------------------------
def test_flow_matching_families_take_flow_matching_schedulers_only(client):
    for model in ("flux-tiny", "sd3-tiny"):
        flow = generate(client, model=model, scheduler="flow_euler")
        assert flow["images"] == generate(client, model=model, scheduler="euler")["images"]
        assert flow["parameters"]["scheduler"] == "flow_euler"
        detail = refused(client, model=model, scheduler="dpmpp_2m")
        assert "'dpmpp_2m'" in detail and "flow-matching" in detail and "flow_euler" in detail
    assert generate(client, model="sdxl-tiny", scheduler="dpmpp_2m_karras")["parameters"]["scheduler"] == \
        "dpmpp_2m_karras"
    assert "flow_euler" in refused(client, model="sdxl-tiny", scheduler="flow_euler")
    assert "flow_euler" in client.get("/health").json()["schedulers"]


# -- SDXL's refiner -------------------------------------------------------------------------------------------------
def test_sdxl_refiner_runs_the_last_steps(client):
    base = generate(client, model="sdxl-tiny", steps=6)
    refined = generate(client, model="sdxl-tiny", steps=6, refiner="sdxl-refiner-tiny")
    earlier = generate(client, model="sdxl-tiny", steps=6, refiner="sdxl-refiner-tiny", refiner_switch_at=0.5)
    assert differ(base, refined) > 1 and differ(refined, earlier) > 1
    assert refined["parameters"]["family_arguments"] == {"refiner": "sdxl-refiner-tiny", "refiner_switch_at": 0.8}
    assert earlier["parameters"]["family_arguments"]["refiner_switch_at"] == 0.5
    # diffusers' name for the switch works too
    assert generate(client, model="sdxl-tiny", steps=6, refiner="sdxl-refiner-tiny",
                    denoising_end=0.5)["images"] == earlier["images"]
    img2img = generate(client, "img2img", model="sdxl-tiny", steps=6, refiner="sdxl-refiner-tiny",
                       image=to_b64(gradient_image(96, 64)), width=None, height=None)
    assert from_b64(img2img["images"][0]).size == (96, 64)
    inpainted = generate(client, "inpainting", model="sdxl-tiny", steps=6, refiner="sdxl-refiner-tiny",
                         image=to_b64(IMAGE), mask_image=to_b64(half_mask(64, 64)))
    assert np.array_equal(first_image(inpainted)[:, :32], pixels(IMAGE)[:, :32])
    # the refiner alone is an img2img model
    assert from_b64(generate(client, "img2img", model="sdxl-refiner-tiny", image=to_b64(IMAGE))["images"][0]).size \
        == (64, 64)
    assert client.post("/text2img", json=FAST | {"model": "sdxl-tiny", "refiner": "nothing"}).status_code == 404


def test_refined_job_counts_its_steps_across_both_models_and_its_png_reproduces_it(client):
    job = client.post("/jobs", json=FAST | {"task": "text2img", "model": "sdxl-tiny", "steps": 10, "seed": 3,
                                            "refiner": "sdxl-refiner-tiny", "save": True}).json()
    events = parse_sse(client.get(f"/jobs/{job['id']}/events").text)
    progress = [(data["step"], data["total_steps"]) for kind, data in events if kind == "progress"]
    assert [step for step, _ in progress] == list(range(1, 11))
    assert progress[-1] == (10, 10)
    finished = wait_for(lambda: (state := client.get(f"/jobs/{job['id']}").json())["images"] and state)
    image_id = finished["images"][0]["id"]  # written by the recorder thread just after the job
    png = Image.open(io.BytesIO(client.get(f"/images/{image_id}").content))
    assert "Refiner: sdxl-refiner-tiny, Refiner switch at: 0.8" in png.text["parameters"]
    again = json.loads(png.text["sdserve"])["request"]
    assert (again["refiner"], again["refiner_switch_at"]) == ("sdxl-refiner-tiny", 0.8)
    again.pop("task")
    assert client.post("/text2img", json=again).json()["images"] == finished["result"]["images"]


# -- previews, result cache, PNG parameters, recorded jobs ----------------------------------------------------------
@pytest.mark.parametrize("model", ["sdxl-tiny", "sd3-tiny", "flux-tiny"])
def test_progress_events_carry_previews_for_each_family(client, model):
    job = client.post("/jobs", json=FAST | {"task": "text2img", "model": model, "width": 64, "height": 96,
                                            "steps": 3}).json()
    events = parse_sse(client.get(f"/jobs/{job['id']}/events").text)
    previews = [data["preview"] for kind, data in events if kind == "progress"]
    assert len(previews) == 3 and all(previews)
    shown = Image.open(io.BytesIO(base64.b64decode(previews[-1])))
    assert shown.width * 3 == shown.height * 2  # the 64x96 image's shape (FLUX's packed latents unpacked)


def test_flux_results_are_cached_saved_and_recorded_with_their_family(client, folder, model_cache):
    body = FAST | {"model": "flux-tiny", "guidance": 2.5, "prompt_2": "for T5", "seed": 21, "save": True}
    first = client.post("/text2img", json=body).json()
    cached = client.post("/text2img", json=body).json()
    assert (first["cached"], cached["cached"], cached["images"]) == (False, True, first["images"])
    record = wait_for(lambda: next((item for item in client.get("/images", params={"model": "flux-tiny"}).json()[
        "images"] if item["job_id"] == first["job_id"]), None))
    png = Image.open(io.BytesIO(client.get(f"/images/{record['id']}").content))
    assert "Distilled CFG Scale: 2.5" in png.text["parameters"]
    request = json.loads(png.text["sdserve"])["request"]
    assert (request["guidance"], request["prompt_2"]) == (2.5, "for T5")
    request.pop("task")
    assert client.post("/text2img", json=request | {"save": False}).json()["images"] == first["images"]
    # Another server on the same database answers the job from its record, family and all.
    with TestClient(create_app(family_settings(folder, model_cache, preload_default_model=False))) as other:
        recorded = other.get(f"/jobs/{first['job_id']}").json()["result"]["parameters"]
    assert recorded["family"] == "flux"
    assert recorded["family_arguments"] == {"prompt_2": "for T5", "guidance": 2.5}
    assert recorded["cfg_scale"] == 2.5


# -- LoRAs ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_files(folder: Path, model_cache: Path) -> dict[str, Path]:
    """LoRA files inside the server's output folder (an allowed LoRA folder)."""
    root = folder / "outputs" / "loras"
    files = {}
    for model, family in FAMILY_OF.items():
        preset = builtins.ensure_builtin(model, model_cache)
        files[f"{family}-diffusers"] = save_diffusers(family_lora(preset, family, seed=1), family, root / family)
    files["sdxl-kohya"] = save_kohya_sdxl(family_lora(builtins.ensure_builtin("sdxl-tiny", model_cache), "sdxl", 2),
                                          root / "sdxl_kohya.safetensors")
    files["flux-kohya"] = save_kohya_flux(builtins.ensure_builtin("flux-tiny", model_cache), 3,
                                          root / "flux_kohya.safetensors")
    return files


@pytest.mark.parametrize(("model", "layout"), [
    ("sdxl-tiny", "sdxl-diffusers"), ("sdxl-tiny", "sdxl-kohya"), ("sd3-tiny", "sd3-diffusers"),
    ("flux-tiny", "flux-diffusers"), ("flux-tiny", "flux-kohya"),
])
def test_loras_of_each_family_and_layout_change_the_image(client, lora_files, model, layout):
    plain = generate(client, model=model)
    with_lora = generate(client, model=model, loras=[{"name": str(lora_files[layout])}])
    off = generate(client, model=model, loras=[{"name": str(lora_files[layout]), "scale": 0}])
    assert differ(plain, with_lora) > 2, "the LoRA did not change the image"
    assert off["images"] == plain["images"]
    assert with_lora["parameters"]["loras"][0]["scale"] == 1.0
    assert generate(client, model=model)["images"] == plain["images"], "the LoRA stayed on after its request"


def test_a_lora_of_another_family_is_refused_and_a_registered_one_has_its_base_family(client, lora_files):
    detail = refused(client, model="flux-tiny", loras=[{"name": str(lora_files["sdxl-diffusers"])}])
    assert "does not fit model 'flux-tiny'" in detail or "no weights" in detail
    answer = client.post("/models", json={"name": "xl-style", "kind": "lora", "source": str(lora_files["sdxl-kohya"]),
                                          "base": "sdxl-tiny"})
    assert answer.status_code == 201 and answer.json()["family"] == "sdxl"
    assert generate(client, model="sdxl-tiny", loras=["xl-style"])["images"] == generate(
        client, model="sdxl-tiny", loras=[{"name": str(lora_files["sdxl-kohya"])}])["images"]
    assert client.delete("/models/xl-style").status_code == 204


# -- registry round trips, single files -----------------------------------------------------------------------------
@pytest.mark.parametrize(("builtin", "route", "family"), [
    ("sdxl-tiny", "text2img", "sdxl"), ("sdxl-refiner-tiny", "img2img", "sdxl-refiner"),
    ("sd3-tiny", "text2img", "sd3"), ("flux-tiny", "text2img", "flux"),
])
def test_a_copy_of_each_preset_registers_with_its_detected_family_and_generates_the_same(client, folder, model_cache,
                                                                                          builtin, route, family):
    copy = shutil.copytree(builtins.ensure_builtin(builtin, model_cache), folder / "copies" / builtin)
    name = f"my-{builtin}"
    registered = client.post("/models", json={"name": name, "source": str(copy)})
    assert registered.status_code == 201, registered.text
    assert registered.json()["family"] == family
    assert client.get(f"/models/{name}").json()["family"] == family
    extra = {"image": to_b64(IMAGE)} if route == "img2img" else {}
    mine = generate(client, route, model=name, **extra)
    assert mine["parameters"]["family"] == family
    assert mine["images"] == generate(client, route, model=builtin, **extra)["images"]
    assert client.delete(f"/models/{name}").status_code == 204
    assert client.get(f"/models/{name}").status_code == 404


def test_an_sdxl_single_file_checkpoint_loads_with_the_sdxl_pipeline_and_generates(client, folder, model_cache):
    preset = builtins.ensure_builtin("sdxl-tiny", model_cache)
    checkpoint = sdxl_single_file(preset, folder / "checkpoints" / "tiny-xl.safetensors")
    answer = client.post("/models", json={"name": "tiny-xl-file", "source": str(checkpoint), "config": str(preset)})
    assert answer.status_code == 201 and answer.json()["family"] == "sdxl"  # from the file's tensor names
    single = generate(client, model="tiny-xl-file", prompt_2="second")
    assert single["parameters"]["family"] == "sdxl"
    # The same weights as the diffusers folder: the same pixels.
    assert single["images"] == generate(client, model="sdxl-tiny", prompt_2="second")["images"]
    state = {model["name"]: model for model in client.get("/pipeline-state").json()["models"]}
    assert state["tiny-xl-file"]["pipelines"][0]["pipeline_class"] == "StableDiffusionXLPipeline"

    pickled = shutil.copy(checkpoint, folder / "checkpoints" / "tiny-xl.ckpt")
    client.post("/models", json={"name": "tiny-xl-pickle", "source": str(pickled), "config": str(preset)})
    answer = client.post("/text2img", json=FAST | {"model": "tiny-xl-pickle"})
    assert answer.status_code == 503 and "SDSERVE_ALLOW_PICKLE" in answer.json()["detail"]


# -- ControlNet on SDXL ---------------------------------------------------------------------------------------------
def test_sdxl_takes_its_controlnet_and_refuses_one_of_another_architecture(client):
    control = {"name": "sdxl-controlnet-tiny", "image": to_b64(gradient_image(64, 64))}
    for route, extra in (("text2img", {}), ("img2img", {"image": to_b64(IMAGE)}),
                         ("inpainting", {"image": to_b64(IMAGE), "mask_image": to_b64(half_mask(64, 64))})):
        plain = generate(client, route, model="sdxl-tiny", **extra)
        steered = generate(client, route, model="sdxl-tiny", controlnet=control, **extra)
        assert differ(plain, steered) > 0.5, route
        assert (steered["parameters"]["controlnet"]["name"], steered["parameters"]["controlnet"]["scale"]) == (
            "sdxl-controlnet-tiny", 1.0)
    assert "does not fit" in refused(client, model="demo", controlnet=control)
    assert "does not fit" in refused(client, model="sdxl-tiny", controlnet=control | {"name": "demo-controlnet"})
    assert "ControlNets" in refused(client, model="flux-tiny", controlnet=control)


# -- compatibility routes pick the family's defaults ----------------------------------------------------------------
def test_compatibility_routes_use_the_model_family_defaults(client):
    a1111 = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "steps": 2, "seed": 1,
                                                   "override_settings": {"sd_model_checkpoint": "sdxl-tiny"}}).json()
    info = json.loads(a1111["info"])
    assert (info["width"], info["height"], info["cfg_scale"]) == (256, 256, 5.0)
    refined = client.post("/sdapi/v1/txt2img", json={
        "prompt": "a fox", "steps": 4, "seed": 1, "width": 64, "height": 64, "refiner_checkpoint": "sdxl-refiner-tiny",
        "refiner_switch_at": 0.5, "override_settings": {"sd_model_checkpoint": "sdxl-tiny"}})
    assert refined.status_code == 200, refined.text
    flux = client.post("/sdapi/v1/txt2img", json={"prompt": "a fox", "steps": 2, "seed": 1, "width": 64, "height": 64,
                                                  "distilled_cfg_scale": 2.0,
                                                  "override_settings": {"sd_model_checkpoint": "flux-tiny"}}).json()
    assert json.loads(flux["info"])["cfg_scale"] == 2.0


# -- telling a family from a checkpoint's tensor names --------------------------------------------------------------
@pytest.mark.parametrize(("keys", "family"), [
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "vae.x"}, "flux"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale"}, "flux"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias"}, "sd3"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.1.model.positional_embedding",
      "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"}, "sdxl"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.model.text_projection"},
     "sdxl-refiner"),
    ({"model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"}, "sd"),
    ({"lora_unet_down_blocks_0.lora_down.weight"}, None),
])
def test_single_file_families_are_told_by_their_tensor_names(keys, family):
    assert family_of_checkpoint_keys(keys) == family


def test_a_single_file_of_no_known_family_asks_for_the_family_field(client, folder):
    odd = folder / "checkpoints" / "odd.safetensors"
    odd.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"some.weight": torch.zeros(2)}, odd)
    assert client.post("/models", json={"name": "odd", "source": str(odd)}).json()["family"] is None
    answer = client.post("/text2img", json=FAST | {"model": "odd"})
    assert answer.status_code == 503 and "family" in answer.json()["detail"]
    assert client.delete("/models/odd").status_code == 204


# -- micro-batching -------------------------------------------------------------------------------------------------
def test_flux_requests_waiting_together_share_a_call_and_family_arguments_run_alone(folder, model_cache):
    body = {"task": "text2img", "model": "flux-tiny", "steps": 3, "width": 64, "height": 64}
    settings = family_settings(folder / "batching", model_cache, result_cache_size=0, preload_default_model=False)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        gate = StepGate(client, "hold the worker")
        client.post("/jobs", json=body | {"prompt": "hold the worker", "seed": 9})
        gate.wait_reached()
        bodies = [body | {"prompt": "a red fox", "seed": 1}, body | {"prompt": "a blue cat", "seed": 2},
                  body | {"prompt": "a blue cat", "seed": 3, "prompt_2": "for T5 only"}]
        ids = [client.post("/jobs", json=each).json()["id"] for each in bodies]
        gate.open()
        results = [wait_for(lambda job_id=job_id: (state := client.get(f"/jobs/{job_id}").json())["result"]
                            and state["result"]) for job_id in ids]
        assert [result["timings"].get("batch_images") for result in results] == [2, 2, None]
        assert results[2]["parameters"]["family_arguments"] == {"prompt_2": "for T5 only"}
        alone = client.post("/text2img", json={key: value for key, value in bodies[1].items() if key != "task"})
    difference = np.abs(first_image(results[1]) - first_image(alone.json()))
    assert difference.max() <= 2 and (difference > 0).mean() < 0.02  # float rounding of another batch size only


def test_hires_fix_runs_on_each_family_and_refuses_latent_upscaling_of_packed_latents(client):
    for model, upscaler in (("sdxl-tiny", "latent"), ("sd3-tiny", "latent"), ("flux-tiny", "lanczos")):
        answer = generate(client, model=model, hires={"width": 128, "height": 96, "upscaler": upscaler})
        assert from_b64(answer["images"][0]).size == (128, 96), model
    detail = refused(client, model="flux-tiny", hires={"width": 128, "height": 128})
    assert "latent" in detail and "FLUX" in detail and "lanczos" in detail
    assert "multiple of 16" in refused(client, model="sd3-tiny", hires={"width": 136, "height": 128})
    assert "refiner and hires" in refused(client, model="sdxl-tiny", refiner="sdxl-refiner-tiny",
                                          hires={"width": 128, "height": 128})
