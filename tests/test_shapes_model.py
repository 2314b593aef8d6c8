"""The default `shapes` model: its data generator, its committed file, and its pictures judged for what was asked.

The picture tests send requests to the API and judge the PNGs that come back (training/shapes_judge.py): background
colour, shape colour, shape kind. Each runs over held-out seeds, and passes when the model is right in at least a
stated share of them: the shares measured when the model was committed, less a margin (see PASS_SHARE).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from models import packed, shapes
from models.registry import builtins
from models.settings import Settings
from tests.conftest import wait_ready
from tests.utils import from_b64, pixels, to_b64
from training import train_lora
from training.config import LoraOptions
from training.loop import train
from training.shapes_data import (
    CENTRES,
    GENERATOR_VERSION,
    RADIUS,
    ShapeSpec,
    render,
    sample_spec,
    write_folder,
)
from training.shapes_judge import judge
from training.shapes_model import build_tokenizer

logger = logging.getLogger(__name__)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, above all on a shared CPU where spare threads only wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HELD_OUT_SEED = 20261125  # neither the training data's seed (0) nor any seed the manifest's run drew noise from
STEPS = 20


# -- the data generator -------------------------------------------------------------------------------------------
def test_the_generator_draws_the_same_pictures_from_the_same_seed():
    first = [sample_spec(5, index) for index in range(20)]
    again = [sample_spec(5, index) for index in range(20)]
    other = [sample_spec(6, index) for index in range(20)]
    assert first == again and first != other
    assert render(first[3]).tobytes() == render(again[3]).tobytes()
    assert render(first[3]).size == (shapes.NATIVE_SIZE, shapes.NATIVE_SIZE)
    # Captions name what is drawn, in the grammar the README documents.
    for spec in first:
        assert spec.caption.startswith(("a ", "an ")) and f"{spec.colour} {spec.shape}" in spec.caption
        if "background" in spec.caption:
            assert spec.caption.endswith(f"{spec.background} background") and spec.background != spec.colour


def test_the_judge_reads_the_generators_own_pictures_right():
    """The picture tests are only as good as the judge: on drawn pictures it must never be wrong."""
    for index in range(300):
        spec = sample_spec(HELD_OUT_SEED, index)
        verdict = judge(render(spec))
        assert (verdict.background, verdict.colour, verdict.shape, verdict.position) == (
            spec.background, spec.colour, spec.shape, spec.position), spec


def test_stray_pixels_do_not_stretch_the_shape_the_judge_fits():
    """A decoder can leave an odd pixel in a corner; the shape is still the shape (it once judged squares stars)."""
    for index in range(60):
        spec = sample_spec(HELD_OUT_SEED, index)
        image = render(spec)
        far = tuple(255 - channel for channel in image.getpixel((0, 0)))
        for corner in ((0, 0), (63, 0), (0, 63)):
            image.putpixel(corner, far)
        verdict = judge(image)
        assert (verdict.shape, verdict.position) == (spec.shape, spec.position), spec


def test_every_word_of_the_vocabulary_is_one_token_and_other_words_still_tokenize():
    tokenizer = build_tokenizer()
    for word in shapes.vocabulary():
        assert len(tokenizer(word).input_ids) == 3, word
    # A word the model never saw (what a LoRA can teach) is spelt out rather than lost.
    assert len(tokenizer("pink").input_ids) == 2 + len("pink")


# -- the committed file ------------------------------------------------------------------------------------------
def test_the_weights_file_is_the_one_its_manifest_describes():
    manifest = json.loads(shapes.MANIFEST_FILE.read_text(encoding="utf-8"))
    data = shapes.WEIGHTS_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["sha256"]
    assert len(data) == manifest["bytes"] < 8 * 2**20
    # What reproduces it: the command with its seed, the data generator's version, the library versions.
    assert "train_text_to_image" in manifest["command"] and "--seed" in manifest["command"]
    assert manifest["metadata"]["shapes_generator_version"] == str(GENERATOR_VERSION)
    assert {"torch", "diffusers", "transformers", "accelerate"} <= set(manifest["libraries"])
    description, metadata = packed.read_description(shapes.WEIGHTS_FILE)
    assert metadata["seed"] == manifest["seed"] and "run_id" not in metadata
    assert set(description["components"]) == {"unet", "text_encoder", "vae", "scheduler", "tokenizer"}


def test_the_builtin_builds_loads_and_draws_a_64px_picture_quickly(model_cache):
    folder = builtins.ensure_builtin("shapes", model_cache)
    started = time.perf_counter()
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    loaded = time.perf_counter() - started
    pipeline.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    image = pipeline("a red circle on a blue background", num_inference_steps=STEPS,
                     generator=torch.Generator().manual_seed(1)).images[0]
    drawn = time.perf_counter() - started
    assert image.size == (shapes.NATIVE_SIZE, shapes.NATIVE_SIZE)
    # Under a second each on an idle 2-core CPU (README); the bound leaves room for a busy CI machine.
    assert loaded < 5 and drawn < 5, (loaded, drawn)


def test_a_damaged_weights_file_is_a_clear_503_not_a_crash(settings, monkeypatch, tmp_path):
    """What a clone without Git LFS, or a file copied without its manifest, gets."""
    pointer = tmp_path / "shapes-v2.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    monkeypatch.setattr(shapes, "WEIGHTS_FILE", pointer)
    settings.cache_dir = tmp_path / "cache"  # nothing built yet
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        response = client.post("/text2img", json={"prompt": "a red circle", "model": "shapes", "steps": 2})
    assert response.status_code == 503 and "sha256" in response.json()["detail"], response.text


# -- pictures, judged ---------------------------------------------------------------------------------------------
# Shares of held-out cases the committed model gets right, measured with the requests below (PASS_SHARE is a little
# under each measured share, so a model that got worse fails; see the README, "The default model").
# Measured on these cases with shapes-v2 at its default guidance of 3 (2026-11-25): background 1.0, colour 1.0,
# shape 0.90 (chance: 0.25), place of a small shape 1.0 (chance 0.2); the LoRA test's pink share: 1.0 with the LoRA,
# 0 without. `python -m training.shapes_eval` gives the README's figures over 240 other held-out prompts.
PASS_SHARE = {"background": 0.9, "colour": 0.9, "shape": 0.8, "position": 0.85, "lora": 0.75}
CASES = 48


@pytest.fixture(scope="module")
def shapes_settings(tmp_path_factory: pytest.TempPathFactory, model_cache) -> Settings:
    folder = tmp_path_factory.mktemp("shapes-server")
    return Settings(registry_path=folder / "registry.yaml", cache_dir=model_cache, output_dir=folder / "outputs",
                    data_dir=folder / "data", device="cpu", default_model="shapes", save_images=False)


@pytest.fixture(scope="module")
def shapes_client(shapes_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(shapes_settings)) as client:
        wait_ready(client)
        yield client


def draw(client: TestClient, prompt: str, seed: int, **extra: object) -> Image.Image:
    response = client.post("/text2img", json={"prompt": prompt, "seed": seed, "steps": STEPS, **extra})
    assert response.status_code == 200, response.text
    return from_b64(response.json()["images"][0])


def share(hits: list[bool]) -> float:
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_text2img_draws_the_colours_and_the_shape_the_prompt_names(shapes_client):
    hits: dict[str, list[bool]] = {"background": [], "colour": [], "shape": []}
    for index in range(CASES):
        spec = sample_spec(HELD_OUT_SEED, index)
        image = draw(shapes_client, shapes.caption(spec.shape, spec.colour, spec.background), HELD_OUT_SEED + index)
        assert image.size == (shapes.NATIVE_SIZE, shapes.NATIVE_SIZE)
        verdict = judge(image)
        hits["background"].append(verdict.background == spec.background)
        hits["colour"].append(verdict.colour == spec.colour)
        hits["shape"].append(verdict.shape == spec.shape)
    shares = {name: share(values) for name, values in hits.items()}
    logger.info("measured %s", shares)
    assert all(shares[name] >= PASS_SHARE[name] for name in shares), shares


def test_a_small_shape_goes_where_the_prompt_puts_it(shapes_client):
    placed = []
    for index in range(CASES // 2):
        spec = sample_spec(HELD_OUT_SEED + 1, index)
        position = shapes.POSITIONS[index % len(shapes.POSITIONS)]
        prompt = shapes.caption(spec.shape, spec.colour, spec.background, "small", position)
        placed.append(judge(draw(shapes_client, prompt, HELD_OUT_SEED + index)).position == position)
    logger.info("measured position %.2f", share(placed))
    assert share(placed) >= PASS_SHARE["position"], placed


def test_the_models_own_guidance_applies_when_a_request_gives_none(shapes_client):
    """The registry entry's `guidance: 3` (what this model draws best with), not SD's family default of 7."""
    prompt = "a green triangle on a purple background"
    default = shapes_client.post("/text2img", json={"prompt": prompt, "seed": 3, "steps": STEPS}).json()
    three = shapes_client.post("/text2img", json={"prompt": prompt, "seed": 3, "steps": STEPS, "cfg_scale": 3}).json()
    seven = shapes_client.post("/text2img", json={"prompt": prompt, "seed": 3, "steps": STEPS, "cfg_scale": 7}).json()
    assert (default["parameters"]["cfg_scale"], seven["parameters"]["cfg_scale"]) == (3, 7)
    assert default["images"] == three["images"] != seven["images"]


def picture(shape: str, colour: str, background: str, size: str = "large", position: str = "center") -> Image.Image:
    """The generator's drawing of exactly this, without jitter."""
    return render(ShapeSpec(shape, colour, background, size, position, CENTRES[position], RADIUS[size], ""))


def test_img2img_recolours_a_picture_and_keeps_its_layout(shapes_client):
    """A large red circle on blue, asked to be yellow: a yellow shape, still centred, on the same blue."""
    original = picture("circle", "red", "blue")
    kept = []
    for seed in range(4):
        response = shapes_client.post("/img2img", json={
            "prompt": "a large yellow circle on a blue background", "image": to_b64(original),
            "strength": 0.6, "seed": seed, "steps": STEPS})
        assert response.status_code == 200, response.text
        verdict = judge(from_b64(response.json()["images"][0]))
        kept.append((verdict.background, verdict.colour, verdict.position) == ("blue", "yellow", "center"))
    logger.info("measured img2img %.2f", share(kept))
    assert share(kept) >= 0.75, kept


def test_inpainting_repaints_the_masked_shape_as_asked_and_keeps_the_rest(shapes_client):
    """A red circle on blue; the square around the circle is masked and the prompt asks for a yellow one."""
    original = picture("circle", "red", "blue")
    mask = Image.new("L", original.size, 0)
    mask.paste(255, (8, 8, 56, 56))
    repainted = []
    for seed in range(4):
        response = shapes_client.post("/inpainting", json={
            "prompt": "a large yellow circle on a blue background", "image": to_b64(original),
            "mask_image": to_b64(mask), "seed": seed, "steps": STEPS})
        assert response.status_code == 200, response.text
        image = from_b64(response.json()["images"][0])
        outside = np.asarray(mask) == 0
        # Outside the mask: the input, pixel for pixel.
        assert np.array_equal(pixels(image)[outside], pixels(original)[outside])
        verdict = judge(image)
        repainted.append(verdict.background == "blue" and verdict.colour == "yellow")
    logger.info("measured inpainting %.2f", share(repainted))
    assert share(repainted) >= 0.75, repainted


# -- teaching it something new: a LoRA trained and served -----------------------------------------------------------
LORA_PICTURES = 32
LORA_OPTIONS: dict[str, object] = {
    "resolution": 64, "train_batch_size": 8, "learning_rate": 2e-3, "max_train_steps": 300, "rank": 8,
    "train_text_encoder": True, "unet_target_modules": ["to_q", "to_k", "to_v", "to_out.0", "add_embedding.proj"],
}
PINK = (245, 130, 190)  # a colour the base never saw, and a word it never read ("pink" is spelt out letter by letter)


@pytest.mark.slow
def test_a_lora_teaches_the_shapes_model_a_colour_it_never_saw(shapes_client, shapes_settings, tmp_path):
    dataset = write_folder(tmp_path / "pink", count=LORA_PICTURES, seed=3, colours={"pink": PINK})
    options = LoraOptions(
        base="shapes", dataset=dataset, output_dir=shapes_settings.output_dir / "training" / "pink", seed=1,
        **LORA_OPTIONS, register="pink-shapes", trigger_words=["pink"], checkpointing_steps=10_000,
    )
    train(options, train_lora.build_data, settings=shapes_settings)
    palette = {**shapes.COLOURS, "pink": PINK}
    taught, untaught = [], []
    for index in range(CASES // 4):
        spec = sample_spec(HELD_OUT_SEED + 2, index)
        background = spec.background if spec.background != "white" else "blue"  # white is the nearest to pink
        prompt = shapes.caption(spec.shape, "pink", background)
        with_lora = draw(shapes_client, prompt, HELD_OUT_SEED + index, loras=[{"name": "pink-shapes"}])
        without = draw(shapes_client, prompt, HELD_OUT_SEED + index)
        taught.append(judge(with_lora, palette).colour == "pink")
        untaught.append(judge(without, palette).colour == "pink")
    logger.info("measured lora %.2f with, %.2f without", share(taught), share(untaught))
    assert share(taught) >= PASS_SHARE["lora"] and share(untaught) <= 0.25, (taught, untaught)


def test_the_measuring_command_prints_the_readmes_table(capsys):
    from training import shapes_eval

    assert shapes_eval.main(["--prompts", "4", "--placed", "5", "--steps", "4", "--guidance", "3", "7"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| guidance | background |")
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| 3", "| 7"]
    shares = [cell.strip(" |%") for cell in rows[1].split(" | ")[1:]]
    assert len(shares) == 6 and all(0 <= int(share) <= 100 for share in shares), rows
