"""ControlNet: the demo ControlNet steers images, shares the base's weights, and seed 003's routes drive it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from fastapi.testclient import TestClient

from models.engine.device import select_device
from models.engine.pipelines import PipelineCache
from models.registry import Registry
from models.registry import builtins as demo
from models.settings import Settings
from tests.lora_factory import random_lora, save_diffusers
from tests.utils import from_b64, gradient_image, half_mask, to_b64

CONTROL = to_b64(gradient_image(64, 64).transpose(0))  # a picture that is not the init image of img2img tests


def text2img(client: TestClient, **extra) -> dict:
    body = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 3, "seed": 11, "save": False} | extra
    response = client.post("/text2img", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def image_bytes(answer: dict) -> bytes:
    return from_b64(answer["images"][0]).tobytes()


def test_controlnet_changes_the_image_and_scale_zero_does_not(client: TestClient) -> None:
    plain = text2img(client)
    steered = text2img(client, controlnet={"name": "demo-controlnet", "image": CONTROL})
    assert steered["parameters"]["controlnet"] == {"name": "demo-controlnet", "scale": 1.0, "guidance_start": 0.0,
                                                   "guidance_end": 1.0, "guess_mode": False}
    assert plain["parameters"]["controlnet"] is None
    difference = np.abs(np.asarray(from_b64(plain["images"][0]), float)
                        - np.asarray(from_b64(steered["images"][0]), float)).mean()
    assert difference > 1.0, "the ControlNet must visibly steer the image"
    # Scale 0 multiplies every ControlNet residual by zero: the UNet sees exactly what it sees without one.
    zero = text2img(client, controlnet={"name": "demo-controlnet", "image": CONTROL, "scale": 0})
    assert image_bytes(zero) == image_bytes(plain)
    # Another control image steers differently; and the plain request afterwards is unchanged.
    other = text2img(client, controlnet={"name": "demo-controlnet", "image": to_b64(gradient_image(64, 64))})
    assert image_bytes(other) != image_bytes(steered)
    after = text2img(client, seed=11, number_of_images=1, save=None)
    assert image_bytes(after) == image_bytes(plain)


def test_controlnet_pipeline_shares_the_base_components(client: TestClient) -> None:
    text2img(client, controlnet={"name": "demo-controlnet", "image": CONTROL})
    cache = client.app.state.engine.cache

    def inspect(cache):
        pipeline, model = cache.get("demo", "text2img", controlnets=("demo-controlnet",))
        return (type(pipeline).__name__, pipeline.unet is model.base.unet, pipeline.vae is model.base.vae,
                pipeline.text_encoder is model.base.text_encoder)

    name, same_unet, same_vae, same_text_encoder = client.app.state.engine.worker.call(inspect).result(30)
    assert name == "StableDiffusionControlNetPipeline"
    assert same_unet and same_vae and same_text_encoder
    assert cache is not None


def test_lora_applies_under_a_controlnet(client: TestClient, settings: Settings, model_cache: Path) -> None:
    lora = save_diffusers(random_lora(demo.ensure_builtin("tiny", model_cache), seed=1), settings.output_dir / "lora")
    control = {"name": "demo-controlnet", "image": CONTROL}
    steered = text2img(client, controlnet=control)
    with_lora = text2img(client, controlnet=control, loras=[{"name": str(lora)}])
    lora_at_zero = text2img(client, controlnet=control, loras=[{"name": str(lora), "scale": 0}])
    assert with_lora["parameters"]["loras"][0]["scale"] == 1.0
    assert image_bytes(with_lora) != image_bytes(steered), "the LoRA on the shared UNet changes ControlNet images"
    assert image_bytes(lora_at_zero) == image_bytes(steered)


def test_img2img_and_inpainting_with_controlnet(client: TestClient) -> None:
    body = {"prompt": "a lighthouse", "image": to_b64(gradient_image(64, 64)), "steps": 4, "seed": 5,
            "strength": 0.75, "save": False}
    plain = client.post("/img2img", json=body)
    steered = client.post("/img2img", json=body | {"controlnet": {"name": "demo-controlnet", "image": CONTROL}})
    assert plain.status_code == steered.status_code == 200, steered.text
    assert image_bytes(plain.json()) != image_bytes(steered.json())
    assert from_b64(steered.json()["images"][0]).size == (64, 64)
    masked = body | {"mask_image": to_b64(half_mask(64, 64)), "strength": 1.0}
    plain = client.post("/inpainting", json=masked)
    steered = client.post("/inpainting", json=masked | {"controlnet": {"name": "demo-controlnet", "image": CONTROL}})
    assert plain.status_code == steered.status_code == 200, steered.text
    plain_pixels, steered_pixels = (np.asarray(from_b64(r.json()["images"][0]), float) for r in (plain, steered))
    assert np.abs(plain_pixels[:, 32:] - steered_pixels[:, 32:]).mean() > 1.0, "the masked half is steered"
    assert np.array_equal(plain_pixels[:, :32], steered_pixels[:, :32]), "the kept half is kept"


def test_controlnet_errors_leave_the_server_as_it_was(client: TestClient, settings: Settings) -> None:
    plain = text2img(client)
    unknown = client.post("/text2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2,
                                             "controlnet": {"name": "nope", "image": CONTROL}})
    assert unknown.status_code == 404
    assert "demo-controlnet" in unknown.json()["detail"]
    not_a_controlnet = client.post("/text2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64,
                                                      "controlnet": {"name": "demo", "image": CONTROL}})
    assert not_a_controlnet.status_code == 404
    assert "base model, not a ControlNet" in not_a_controlnet.json()["detail"]
    bad_image = client.post("/text2img", json={"prompt": "x", "controlnet": {"name": "demo-controlnet",
                                                                             "image": "bm90IGFuIGltYWdl"}})
    assert bad_image.status_code == 422
    assert "controlnet.0.image" in bad_image.json()["detail"]  # one ControlNet is a list of one

    # A ControlNet made for another UNet (wider text embeddings): a clear 422, nothing kept loaded.
    folder = settings.output_dir / "other-controlnet"
    other_unet = UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=16,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=16,
    )
    ControlNetModel.from_unet(other_unet).save_pretrained(folder)
    registered = client.post("/models", json={"name": "other-cn", "kind": "controlnet", "source": str(folder)})
    assert registered.status_code in (200, 201), registered.text
    mismatch = client.post("/text2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 2,
                                              "controlnet": {"name": "other-cn", "image": CONTROL}})
    assert mismatch.status_code == 422
    assert "does not fit model 'demo'" in mismatch.json()["detail"]
    assert "cross_attention_dim" in mismatch.json()["detail"]
    compat = client.post("/load-controlnet/", json={"controlnet_path": str(folder), "adapter_name": "other"})
    assert compat.status_code == 422
    assert client.get("/active-controlnets/").json()["active_controlnets"] == []
    assert image_bytes(text2img(client)) == image_bytes(plain)


def test_seed_003_controlnet_flow(client: TestClient, settings: Settings) -> None:
    form = {"prompt": "a lighthouse", "height": "64", "width": "64", "num_inference_steps": "3"}
    files = {"control_image": ("control.png", io.BytesIO(_png(gradient_image(64, 64))), "image/png")}
    refused = client.post("/generate-image/", data=form, files=files)
    assert refused.status_code == 422
    assert "/load-controlnet/" in refused.json()["detail"]

    assert client.post("/load-controlnet/", json={"controlnet_path": "demo-controlnet",
                                                  "lora_weights_path": "/x"}).status_code == 422
    loaded = client.post("/load-controlnet/", json={"controlnet_path": "demo-controlnet", "adapter_name": "edges",
                                                    "torch_dtype": "float16"})
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["name"] == "edges"
    assert client.get("/active-controlnets/").json()["active_controlnets"] == ["edges"]

    plain = client.post("/generate-image/", data=form)
    files = {"control_image": ("control.png", io.BytesIO(_png(gradient_image(64, 64))), "image/png")}
    steered = client.post("/generate-image/", data=form, files=files)
    assert plain.status_code == steered.status_code == 200, steered.text
    assert steered.headers["content-type"] == "image/png"
    assert steered.content != plain.content
    junk = {"control_image": ("control.png", io.BytesIO(b"not an image"), "image/png")}
    assert client.post("/generate-image/", data=form, files=junk).status_code == 422

    assert client.request("DELETE", "/unload-controlnet/", params={"model_key": "nope"}).status_code == 404
    unloaded = client.request("DELETE", "/unload-controlnet/", params={"model_key": "edges"})
    assert unloaded.status_code == 200, unloaded.text
    assert client.get("/active-controlnets/").json()["active_controlnets"] == []


def test_client_named_controlnet_paths_stay_inside_the_allowed_folders(client: TestClient, tmp_path: Path) -> None:
    outside = tmp_path.parent / "elsewhere-controlnet"
    refused = client.post("/load-controlnet/", json={"controlnet_path": str(outside)})
    assert refused.status_code == 403
    sneaky = client.post("/load-controlnet/", json={"controlnet_path": "../../etc"})
    assert sneaky.status_code == 403


def test_demo_controlnet_is_built_once_and_fits_the_demo_unet(model_cache: Path) -> None:
    folder = demo.ensure_builtin("controlnet-tiny", model_cache)
    assert demo.ensure_builtin("controlnet-tiny", model_cache) == folder
    controlnet = ControlNetModel.from_pretrained(folder)
    assert any(torch.count_nonzero(block.weight) for block in controlnet.controlnet_down_blocks)
    unet = UNet2DConditionModel.from_pretrained(demo.ensure_builtin("tiny", model_cache) / "unet")
    assert list(controlnet.config.block_out_channels) == list(unet.config.block_out_channels)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_deriving_keeps_the_shared_weights_in_the_server_dtype(settings: Settings) -> None:
    """diffusers' from_pipe casts to float32 unless told otherwise; under float16/bfloat16 that would convert
    the base's shared UNet. bfloat16 on CPU stands in for a GPU's float16 here."""
    half = settings.model_copy(update={"dtype": "bfloat16"})
    registry = Registry(half.registry_path)
    cache = PipelineCache(half, registry, select_device(half))
    pipeline, model = cache.get("demo", "text2img", controlnets=("demo-controlnet",))
    assert pipeline.unet is model.base.unet
    assert model.base.unet.dtype == pipeline.controlnet.dtype == torch.bfloat16
    again, _ = cache.get("demo", "text2img", controlnets=("demo-controlnet",))
    assert again is pipeline, "the derived pipeline is kept, not rebuilt per request"
    assert cache.controlnets.unload("demo-controlnet")
    assert cache.get("demo", "text2img", controlnets=("demo-controlnet",))[0] is not pipeline


def test_several_controlnets_run_as_one_multi_controlnet_on_the_base(client: TestClient) -> None:
    client.post("/models", json={"name": "cn-two", "kind": "controlnet", "source": "demo:controlnet-tiny"})
    one = text2img(client, controlnet={"name": "demo-controlnet", "image": CONTROL})
    other = to_b64(gradient_image(64, 64))
    both = text2img(client, controlnet=[{"name": "demo-controlnet", "image": CONTROL},
                                        {"name": "cn-two", "image": other, "scale": 0.5}])
    assert [c["name"] for c in both["parameters"]["controlnet"]] == ["demo-controlnet", "cn-two"]
    assert image_bytes(both) != image_bytes(one)
    # The second at scale 0 adds nothing: the same pixels as the first alone.
    zero = text2img(client, controlnet=[{"name": "demo-controlnet", "image": CONTROL},
                                        {"name": "cn-two", "image": other, "scale": 0}])
    assert image_bytes(zero) == image_bytes(one)
    state = client.get("/pipeline-state/").json()
    assert state["controlnet_attached"] and state["controlnets"] == ["demo-controlnet", "cn-two"]

    def inspect(cache):
        pipeline, model = cache.get("demo", "text2img", controlnets=("demo-controlnet", "cn-two"))
        return type(pipeline.controlnet).__name__, pipeline.unet is model.base.unet, len(pipeline.controlnet.nets)

    assert client.app.state.engine.worker.call(inspect).result(30) == ("MultiControlNetModel", True, 2)
