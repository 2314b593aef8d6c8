"""Routing and translation against a fake engine: what each API surface asks the engine for, without a pipeline."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from models.settings import Settings
from models.types import LoraSpec
from tests.fake_engine import FakeEngine
from tests.utils import from_b64, gradient_image, half_mask, to_b64

IMAGE = to_b64(gradient_image(64, 64))


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def fake_client(tmp_path, engine: FakeEngine) -> Iterator[TestClient]:
    settings = Settings(registry_path=tmp_path / "registry.yaml", data_dir=tmp_path / "data", device="cpu")
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def test_native_routes_send_the_engine_their_task_and_fields(fake_client, engine):
    body = {"prompt": "a fox", "seed": 5, "steps": 3, "width": 96, "height": 64, "cfg_scale": 4.5,
            "loras": ["style", {"name": "ink", "scale": 0.3}], "number_of_images": 2}
    answer = fake_client.post("/text2img", json=body)
    assert answer.status_code == 200, answer.text
    assert [from_b64(image).size for image in answer.json()["images"]] == [(96, 64), (96, 64)]
    assert answer.json()["seeds"] == [5, 6]
    fake_client.post("/img2img", json={"prompt": "x", "image": IMAGE, "strength": 0.4})
    fake_client.post("/inpainting", json={"prompt": "x", "image": IMAGE, "mask_image": to_b64(half_mask(64, 64))})
    text2img, img2img, inpainting = engine.submitted
    assert (text2img.task, text2img.seed, text2img.steps, text2img.guidance_scale, text2img.num_images) == (
        "text2img", 5, 3, 4.5, 2)
    assert text2img.loras == (LoraSpec("style"), LoraSpec("ink", scale=0.3))
    assert (img2img.task, img2img.strength, img2img.image.size) == ("img2img", 0.4, (64, 64))
    assert inpainting.task == "inpainting" and inpainting.mask_image is not None


def test_invalid_bodies_never_reach_the_engine(fake_client, engine):
    for body in ({"prompt": "x", "width": 65}, {"steps": 2}, {"prompt": "x", "loras": [{"name": ""}]}):
        assert fake_client.post("/text2img", json=body).status_code == 422
    assert fake_client.post("/img2img", json={"prompt": "x", "image": "%%%"}).status_code == 422
    assert engine.submitted == []


def test_a1111_translates_samplers_lora_tags_batches_and_model_titles(fake_client, engine):
    engine.entries["other"] = engine.entries["demo"]
    body = {"prompt": "a fox <lora:ink:0.5>", "sampler_name": "DPM++ 2M", "scheduler": "Karras", "batch_size": 2,
            "n_iter": 2, "seed": 3, "steps": 4, "width": 64, "height": 64,
            "override_settings": {"sd_model_checkpoint": "other [0123abcd]"}}
    answer = fake_client.post("/sdapi/v1/txt2img", json=body)
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["images"]) == 4
    request = engine.submitted[0]  # n_iter 2: one job per iteration of batch_size images, as A1111 runs them
    assert (request.prompt, request.scheduler, request.num_images, request.model) == (
        "a fox", "dpmpp_2m_karras", 2, "other")
    assert [(r.seed, r.num_images) for r in engine.submitted] == [(3, 2), (5, 2)]
    assert request.loras == (LoraSpec("ink", scale=0.5),)


def test_openai_sizes_models_and_urls(fake_client, engine):
    answer = fake_client.post("/v1/images/generations",
                              json={"prompt": "a fox", "size": "96x64", "model": "dall-e-3", "n": 2,
                                    "response_format": "url"})
    assert answer.status_code == 200, answer.text
    urls = [item["url"] for item in answer.json()["data"]]
    assert len(urls) == 2 and all(url.startswith("http://testserver/v1/images/files/") for url in urls)
    request = engine.submitted[0]
    assert (request.width, request.height, request.model, request.num_images) == (96, 64, None, 2)
    assert fake_client.post("/v1/images/generations", json={"prompt": "x", "size": "big"}).status_code == 400


def test_seed_000_form_sentinels_and_seed_004_batches(fake_client, engine):
    form = {"text_prompt": "a fox", "manual_seed": "7", "negative_prompt": "null", "lora_hugging_face_1": "None",
            "inference_steps": "3"}
    answer = fake_client.post("/submit", data=form)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(answer.content)).size == (64, 64)
    submitted = engine.submitted[0]
    assert (submitted.negative_prompt, submitted.loras, submitted.seed, submitted.model) == (None, (), 7, None)
    imagined = fake_client.post("/imagine", json={"prompt": "x", "n_samples": 2, "n_iter": 3, "H": 64, "W": 64})
    assert imagined.status_code == 200 and len(imagined.json()) == 6


def test_unknown_model_is_404_listing_the_registered_ones(fake_client):
    response = fake_client.post("/text2img", json={"prompt": "x", "model": "nope"})
    assert response.status_code == 404
    assert response.json()["known_models"] == ["demo"]


def test_cancelling_a_job_the_engine_holds_answers_202_then_it_ends_cancelled(tmp_path):
    gate = threading.Event()
    engine = FakeEngine(gate=gate)
    settings = Settings(registry_path=tmp_path / "registry.yaml", data_dir=tmp_path / "data", device="cpu")
    with TestClient(create_app(settings, engine=engine)) as client:
        created = client.post("/jobs", json={"task": "text2img", "prompt": "held"})
        assert created.status_code == 202
        job_id = created.json()["id"]
        assert client.get(f"/jobs/{job_id}").json()["status"] == "running"
        stopping = client.delete(f"/jobs/{job_id}")
        assert stopping.status_code == 202 and stopping.json()["cancel_requested"] is True
        gate.set()
        events = client.get(f"/jobs/{job_id}/events").text
        assert "event: cancelled" in events
        assert client.get(f"/jobs/{job_id}").json()["status"] == "cancelled"
        assert client.delete(f"/jobs/{job_id}").status_code == 409


def test_health_and_models_come_from_the_engine(fake_client, engine):
    health = fake_client.get("/health")
    assert health.status_code == 200 and health.json()["device"]["device"] == "fake"
    assert fake_client.post("/models", json={"name": "mine", "source": "/x"}).status_code == 201
    listed = fake_client.get("/models").json()
    assert [model["name"] for model in listed["models"]] == ["demo", "mine"]
    assert fake_client.delete("/models/mine").status_code == 204
    assert "mine" not in engine.entries
