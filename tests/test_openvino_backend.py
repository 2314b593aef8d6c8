"""The OpenVINO backend on the demo model: images match eager diffusers within a stated tolerance, the exports (UNet
and VAE decoder) are made once and reused after a restart, LoRA and other uncovered calls run on torch, detaching
gives torch back, selection per registry entry and by setting, and clear refusals where it cannot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from fastapi.testclient import TestClient

from api.app import create_app
from models.engine import openvino_export, openvino_unet, openvino_vae
from models.engine.backends import OpenVinoParts, apply_backend, backend_for
from models.errors import ModelUnavailable
from models.registry import builtins as demo
from models.settings import Settings
from tests.conftest import wait_ready
from tests.lora_factory import random_lora, save_diffusers
from tests.utils import from_b64, pixels

pytest.importorskip("openvino")

# Largest difference allowed between an OpenVINO image and the eager one, in 8-bit pixel levels. OpenVINO runs the
# UNet and the VAE decoder in float32 (its INFERENCE_PRECISION_HINT is set to f32), so the noise predictions differ
# from torch's by about 1e-6, the decoded pixels by about 1e-5 (of 2.0), and the images by at most one level after
# rounding.
PIXEL_TOLERANCE = 2
CPU = torch.device("cpu")


def load(folder: Path) -> DiffusionPipeline:
    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def draw(pipeline: DiffusionPipeline, size: int = 128, steps: int = 4, seed: int = 5) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    with torch.inference_mode():
        image = pipeline("a red circle", num_inference_steps=steps, width=size, height=size,
                         guidance_scale=7.0, generator=generator).images[0]
    return pixels(image)


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder of its own (the demo is built into it), so the first export below is this module's."""
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def demo_folder(ov_cache: Path) -> Path:
    return demo.ensure_builtin("tiny", ov_cache)


def decode_levels(vae: torch.nn.Module, latents: torch.Tensor) -> np.ndarray:
    """`vae.decode` as the pipelines call it, in 8-bit levels (the image processor's mapping, before rounding)."""
    with torch.inference_mode():
        decoded = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return ((decoded / 2 + 0.5).clamp(0, 1) * 255).numpy()


@pytest.fixture(scope="module")
def loaded_parts(ov_cache: Path, demo_folder: Path) -> tuple[DiffusionPipeline, OpenVinoParts]:
    pipeline = load(demo_folder)
    parts = apply_backend(pipeline, "openvino", CPU, ov_cache, "demo")
    assert parts is not None and parts.vae_decoder is not None
    return pipeline, parts


@pytest.fixture(scope="module")
def first_load(loaded_parts) -> tuple[DiffusionPipeline, openvino_unet.OpenVinoUNet]:
    pipeline, parts = loaded_parts
    return pipeline, parts.unet


@pytest.fixture(scope="module")
def eager(demo_folder: Path) -> DiffusionPipeline:
    return load(demo_folder)


def test_first_load_exports_into_the_cache_folder(first_load, ov_cache):
    _, fast = first_load
    assert fast.exported
    assert fast.folder.parent == ov_cache / "openvino"
    assert (fast.folder / "unet.xml").is_file() and (fast.folder / "unet.bin").stat().st_size > 1_000_000


def test_first_load_exports_the_vae_decoder_beside_the_unet(loaded_parts, ov_cache):
    pipeline, parts = loaded_parts
    decoder = parts.vae_decoder
    assert decoder.exported and parts.exported
    assert decoder.folder.parent == ov_cache / "openvino" and decoder.folder.name.startswith("vae-decoder-")
    assert (decoder.folder / "vae_decoder.xml").is_file() and (decoder.folder / "vae_decoder.bin").stat().st_size
    assert pipeline.vae.decoder._sdserve_openvino is decoder
    assert "UNet (exported to" in parts.describe() and "VAE decoder (exported to" in parts.describe()


def test_images_match_eager_within_tolerance(first_load, eager):
    pipeline, fast = first_load
    decoder = pipeline.vae.decoder._sdserve_openvino
    before, decodes = dict(fast.calls), dict(decoder.calls)
    for size in (128, 256):  # neither is the size the export was traced at
        difference = np.abs(draw(pipeline, size) - draw(eager, size))
        assert difference.max() <= PIXEL_TOLERANCE, f"{size}x{size}: max difference {difference.max()}"
    # Every UNet call ran on OpenVINO: 4 steps at each of two sizes, guidance batched into one call per step.
    assert fast.calls["openvino"] - before["openvino"] == 8
    assert fast.calls["torch"] == before["torch"]
    # And each image's decode.
    assert decoder.calls["openvino"] - decodes["openvino"] == 2 and decoder.calls["torch"] == decodes["torch"]


@pytest.mark.parametrize(("batch", "height", "width"), [(1, 16, 16), (2, 9, 13), (1, 40, 24)])
def test_vae_decodes_match_eager_at_any_latent_size(loaded_parts, eager, batch, height, width):
    """The decoder graph has dynamic batch, height and width: odd and non-square latents run on it too."""
    pipeline, parts = loaded_parts
    latents = torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(height))
    before = dict(parts.vae_decoder.calls)
    fast, reference = decode_levels(pipeline.vae, latents), decode_levels(eager.vae, latents)
    assert fast.shape == reference.shape == (batch, 3, 8 * height, 8 * width)
    difference = np.abs(fast.round() - reference.round())
    assert difference.max() <= PIXEL_TOLERANCE and difference.mean() < 0.01, (difference.max(), difference.mean())
    assert parts.vae_decoder.calls["openvino"] - before["openvino"] == 1


def test_tiled_and_sliced_vae_decodes_run_each_piece_on_openvino(loaded_parts, eager):
    pipeline, parts = loaded_parts
    latents = torch.randn(2, 4, 72, 72, generator=torch.Generator().manual_seed(1))  # 576 px: over the tile size
    try:
        for each in (pipeline.vae, eager.vae):
            each.enable_tiling()
            each.enable_slicing()
        before = dict(parts.vae_decoder.calls)
        difference = np.abs(decode_levels(pipeline.vae, latents).round() - decode_levels(eager.vae, latents).round())
        assert difference.max() <= PIXEL_TOLERANCE
        # Slicing decodes the two images apart, tiling each one in overlapping tiles: every tile on OpenVINO.
        tiles = parts.vae_decoder.calls["openvino"] - before["openvino"]
        assert tiles % 2 == 0 and tiles // 2 > 1, tiles
        assert parts.vae_decoder.calls["torch"] == before["torch"]
    finally:
        for each in (pipeline.vae, eager.vae):
            each.disable_tiling()
            each.disable_slicing()


def test_a_restart_reuses_the_export(first_load, ov_cache, demo_folder):
    _, first = first_load
    ir = first.folder / "unet.xml"
    stamp = ir.stat().st_mtime_ns
    again = apply_backend(load(demo_folder), "openvino", CPU, ov_cache, "demo")  # a new process would do the same
    assert again is not None and not again.unet.exported
    assert again.unet.folder == first.folder and ir.stat().st_mtime_ns == stamp
    assert len(list((ov_cache / "openvino").glob("unet-*/unet.xml"))) == 1
    decoder_ir = first.folder.parent.glob("vae-decoder-*/vae_decoder.xml")
    assert again.vae_decoder is not None and not again.vae_decoder.exported and not again.exported
    assert [path.parent for path in decoder_ir] == [again.vae_decoder.folder]


def test_other_weights_get_another_export(demo_folder):
    unet = load(demo_folder).unet
    identity = openvino_unet.unet_identity(unet)
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-3)  # a fine-tune of the same architecture must not reuse the base's export
    assert openvino_unet.unet_identity(unet) != identity
    vae = load(demo_folder).vae
    identity = openvino_vae.decoder_identity(vae)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1e-3)
    assert openvino_vae.decoder_identity(vae) != identity


def test_vae_calls_the_export_does_not_cover_run_on_torch(ov_cache, demo_folder, eager):
    pipeline = load(demo_folder)
    decoder = apply_backend(pipeline, "openvino", CPU, ov_cache, "demo").vae_decoder
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    # A call that needs gradients (fine-tuning through the decoder): torch, which can backpropagate.
    wanted = latents.clone().requires_grad_(True)
    pipeline.vae.decode(wanted).sample.sum().backward()
    assert wanted.grad is not None and decoder.calls == {"openvino": 0, "torch": 1}
    # Another dtype: the torch decoder, so the decode is eager's exactly.
    for each in (pipeline.vae, eager.vae):
        each.to(torch.float64)
    try:
        assert np.array_equal(decode_levels(pipeline.vae, latents.double()), decode_levels(eager.vae, latents.double()))
        assert decoder.calls == {"openvino": 0, "torch": 2}
    finally:
        for each in (pipeline.vae, eager.vae):
            each.to(torch.float32)


def test_detach_gives_torch_back(ov_cache, demo_folder, eager):
    pipeline = load(demo_folder)
    parts = apply_backend(pipeline, "openvino", CPU, ov_cache, "demo")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    decode_levels(pipeline.vae, latents)
    assert parts.vae_decoder.calls["openvino"] == 1
    openvino_vae.detach(pipeline.vae)
    openvino_unet.detach(pipeline.unet)
    assert "forward" not in vars(pipeline.vae.decoder) and "forward" not in vars(pipeline.unet)
    assert not hasattr(pipeline.vae.decoder, "_sdserve_openvino") and not hasattr(pipeline.unet, "_sdserve_openvino")
    # Eager's images again, bit for bit, and nothing more reached the compiled models.
    assert np.array_equal(decode_levels(pipeline.vae, latents), decode_levels(eager.vae, latents))
    assert np.array_equal(draw(pipeline, steps=2), draw(eager, steps=2))
    assert parts.vae_decoder.calls == {"openvino": 1, "torch": 0} and parts.unet.calls == {"openvino": 0, "torch": 0}


def test_lora_calls_run_on_torch_and_match_eager_exactly(first_load, eager, demo_folder, tmp_path):
    pipeline, fast = first_load
    save_diffusers(random_lora(demo_folder, seed=1), tmp_path / "a")
    for each in (pipeline, eager):
        each.load_lora_weights(str(tmp_path / "a"), adapter_name="a")
    try:
        before = dict(fast.calls)
        with_lora = draw(pipeline)
        assert fast.calls["torch"] - before["torch"] == 4 and fast.calls["openvino"] == before["openvino"]
        # The UNet's torch modules ran (the LoRA only touches the UNet; the decode stays on OpenVINO).
        assert np.abs(with_lora - draw(eager)).max() <= PIXEL_TOLERANCE
        for each in (pipeline, eager):
            each.disable_lora()
        plain = draw(pipeline)
        assert fast.calls["openvino"] - before["openvino"] == 4  # LoRAs off: the fast path again
        assert np.abs(plain - draw(eager)).max() <= PIXEL_TOLERANCE
        assert np.abs(plain - with_lora).max() > 10  # the LoRA did change the image
    finally:
        for each in (pipeline, eager):
            each.delete_adapters(["a"])


def test_sizes_the_export_does_not_cover_run_on_torch(first_load, eager):
    pipeline, fast = first_load
    before = dict(fast.calls)
    # 72 px is a 9-latent side: the demo UNet downsamples once, so its traced graph needs even latent sides. The
    # decoder's graph covers any size, so the decode still runs on OpenVINO.
    decodes = dict(pipeline.vae.decoder._sdserve_openvino.calls)
    assert np.abs(draw(pipeline, size=72, steps=2) - draw(eager, size=72, steps=2)).max() <= PIXEL_TOLERANCE
    assert fast.calls["torch"] - before["torch"] == 2 and fast.calls["openvino"] == before["openvino"]
    assert pipeline.vae.decoder._sdserve_openvino.calls["openvino"] - decodes["openvino"] == 1


def test_refusals_name_the_model_and_the_fix(demo_folder, ov_cache, monkeypatch):
    pipeline = load(demo_folder)
    with pytest.raises(ModelUnavailable, match=r"'demo'.*float32 models on the CPU.*backend torch"):
        apply_backend(pipeline, "openvino", torch.device("cuda"), ov_cache, "demo")
    with pytest.raises(ModelUnavailable, match="unknown backend 'tensorrt'"):
        apply_backend(pipeline, "tensorrt", CPU, ov_cache, "demo")

    def missing() -> None:
        raise openvino_export.OpenVinoMissing("the OpenVINO backend needs the openvino package: pip install x")

    monkeypatch.setattr(openvino_export, "load_openvino", missing)
    with pytest.raises(ModelUnavailable, match="'demo'.*needs the openvino package"):
        apply_backend(pipeline, "openvino", CPU, ov_cache, "demo")
    assert apply_backend(pipeline, "torch", CPU, ov_cache, "demo") is None  # torch needs nothing


def test_registry_entry_overrides_the_setting():
    assert backend_for("openvino", "torch") == "openvino"
    assert backend_for(None, "openvino") == "openvino"
    assert backend_for(None, "torch") == "torch"


def test_server_runs_a_registry_entry_on_openvino(first_load, ov_cache, tmp_path):
    """`backend: openvino` on one entry: that base runs its UNet on OpenVINO, reusing the export, and its images
    match the same request on the default (torch) base."""
    _, first = first_load
    stamp = (first.folder / "unet.xml").stat().st_mtime_ns
    registry = tmp_path / "registry.yaml"
    registry.write_text(
        "models:\n  demo:\n    source: demo:tiny\n  demo-fast:\n    source: demo:tiny\n    backend: openvino\n",
        encoding="utf-8",
    )
    settings = Settings(registry_path=registry, cache_dir=ov_cache, output_dir=tmp_path / "outputs",
                        data_dir=tmp_path / "data", device="cpu", default_model="demo")
    body = {"prompt": "a red circle", "seed": 3, "steps": 3, "width": 128, "height": 128}
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        fast = client.post("/text2img", json=body | {"model": "demo-fast"})
        plain = client.post("/text2img", json=body | {"model": "demo"})
        assert fast.status_code == plain.status_code == 200, fast.text
        listed = client.get("/models/demo-fast").json()
        loaded = {model.name: model for model in client.app.state.engine.cache.loaded()}
    assert listed["backend"] == "openvino"
    difference = np.abs(pixels(from_b64(fast.json()["images"][0])) - pixels(from_b64(plain.json()["images"][0])))
    assert difference.max() <= PIXEL_TOLERANCE
    router = loaded["demo-fast"].base.unet._sdserve_openvino
    assert router.calls["openvino"] == 3 and not router.exported
    decoder = loaded["demo-fast"].base.vae.decoder._sdserve_openvino
    assert decoder.calls == {"openvino": 1, "torch": 0} and not decoder.exported
    assert not hasattr(loaded["demo"].base.unet, "_sdserve_openvino")
    assert not hasattr(loaded["demo"].base.vae.decoder, "_sdserve_openvino")
    assert (first.folder / "unet.xml").stat().st_mtime_ns == stamp
