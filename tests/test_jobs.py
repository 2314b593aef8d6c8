"""The jobs API in process: submit, follow, cancel, backpressure, the result cache, saved images and their PNGs."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.app import create_app
from tests.conftest import wait_ready
from tests.utils import StepGate, from_b64, parse_sse, wait_for

FAST = {"prompt": "a red fox", "steps": 4, "width": 64, "height": 64}
# Slow enough on the demo model to be caught running (half a second a step or more on a small CPU), never
# waited out: every test that starts one cancels it.
SLOW = {"task": "text2img", "prompt": "a slow one", "steps": 20, "width": 64, "height": 64}


@contextmanager
def app_client(settings, **overrides) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update=overrides))) as client:
        wait_ready(client)
        yield client


def job_state(client: TestClient, job_id: str) -> dict:
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def flush_records(client: TestClient) -> None:
    client.app.state.engine.recorder.flush()


def test_job_is_accepted_then_succeeds_with_the_native_result(client):
    created = client.post("/jobs", json={"task": "text2img", **FAST, "seed": 11})
    assert created.status_code == 202, created.text
    body = created.json()
    job_id = body["id"]
    assert body["status"] in ("queued", "running")
    assert body["links"] == {"self": f"/jobs/{job_id}", "events": f"/jobs/{job_id}/events"}
    assert created.headers["location"] == f"/jobs/{job_id}"

    state = wait_for(lambda: (s := job_state(client, job_id))["status"] == "succeeded" and s)
    assert state["step"] == state["total_steps"] == 4
    assert state["queue_position"] is None and state["error"] is None
    assert state["created_at"] <= state["started_at"] <= state["finished_at"]
    result = state["result"]
    assert result["job_id"] == job_id and result["seeds"] == [11] and result["parameters"]["task"] == "text2img"
    assert from_b64(result["images"][0]).size == (64, 64)

    listed = client.get("/jobs", params={"limit": 5}).json()
    assert listed["total"] >= 1 and listed["jobs"][0]["id"] == job_id
    assert listed["jobs"][0]["result"] is None  # lists stay small; GET /jobs/{id} has the images


def test_job_body_errors_are_clear_422s(client):
    missing_task = client.post("/jobs", json=FAST)
    assert missing_task.status_code == 422 and "task" in missing_task.json()["detail"]
    bad_task = client.post("/jobs", json={**FAST, "task": "video"})
    assert bad_task.status_code == 422 and "task" in bad_task.json()["detail"]
    no_image = client.post("/jobs", json={**FAST, "task": "img2img"})
    assert no_image.status_code == 422 and "image: is required" in no_image.json()["detail"]
    assert client.get("/jobs/" + "0" * 32).status_code == 404
    assert client.get("/jobs/not-an-id").status_code == 422
    assert client.get("/jobs", params={"status": "sleeping"}).status_code == 422


def test_events_arrive_in_order_with_previews_and_end_with_the_result(settings):
    with app_client(settings, preview_every=2) as client:
        job_id = client.post("/jobs", json={"task": "text2img", **FAST, "steps": 6, "seed": 3}).json()["id"]
        stream = client.get(f"/jobs/{job_id}/events")
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(stream.text)
        kinds = [kind for kind, _ in events]
        # A stream may join after the start: it then begins with the replay of the current state.
        assert kinds[0] in ("queued", "started", "progress")
        assert kinds[-1] == "done" and kinds.count("done") == 1
        assert "error" not in kinds and "cancelled" not in kinds
        steps = [data["step"] for kind, data in events if kind == "progress"]
        assert steps == list(range(steps[0], 7)) and steps[-1] == 6
        assert all(data["total_steps"] == 6 for kind, data in events if kind == "progress")
        previews = {data["step"]: data["preview"] for kind, data in events if kind == "progress" and "preview" in data}
        assert set(previews) <= {2, 4, 6} and 6 in previews
        preview = Image.open(io.BytesIO(base64.b64decode(previews[6])))
        assert preview.format == "JPEG" and max(preview.size) <= 192
        done = events[-1][1]
        assert done["job_id"] == job_id and done["status"] == "succeeded"
        assert done["result"]["images"] == job_state(client, job_id)["result"]["images"]

        # Connecting after the end replays just the end.
        again = parse_sse(client.get(f"/jobs/{job_id}/events").text)
        assert [kind for kind, _ in again] == ["done"]
        assert again[0][1]["result"]["images"] == done["result"]["images"]


def test_cancel_queued_at_once_and_running_between_steps_then_the_next_job_runs(client):
    gate = StepGate(client, SLOW["prompt"])  # holds the slow job at its first step
    slow = client.post("/jobs", json=SLOW).json()["id"]
    gate.wait_reached()
    queued = client.post("/jobs", json={"task": "text2img", **FAST}).json()["id"]
    running = job_state(client, slow)
    assert running["status"] == "running" and running["queue_position"] == 0 and running["total_steps"] == 20
    assert running["step"] == 1
    assert job_state(client, queued)["queue_position"] == 1

    cancelled = client.delete(f"/jobs/{queued}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["step"] == 0
    assert parse_sse(client.get(f"/jobs/{queued}/events").text)[-1][0] == "cancelled"

    stopped = client.delete(f"/jobs/{slow}")  # it stops at the end of the step it is in
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["status"] == "cancelled" and stopped.json()["step"] == 1
    assert stopped.json()["error"] == "cancelled"
    assert [kind for kind, _ in parse_sse(client.get(f"/jobs/{slow}/events").text)] == ["cancelled"]
    assert client.delete(f"/jobs/{slow}").status_code == 409

    # The worker is free at once: a small job runs straight away.
    after = client.post("/text2img", json={**FAST, "seed": 9})
    assert after.status_code == 200, after.text
    assert after.json()["timings"]["queued_s"] < 1.0
    flush_records(client)
    records = {job["id"]: job["status"] for job in client.get("/jobs").json()["jobs"]}
    assert records[slow] == "cancelled" and records[queued] == "cancelled"


def test_a_full_queue_answers_429_with_retry_after(settings):
    with app_client(settings, queue_size=1) as client:
        gate = StepGate(client, SLOW["prompt"])
        slow = client.post("/jobs", json=SLOW).json()["id"]
        gate.wait_reached()
        waiting = client.post("/jobs", json={"task": "text2img", **FAST})
        assert waiting.status_code == 202
        for refused in (client.post("/jobs", json={"task": "text2img", **FAST}), client.post("/text2img", json=FAST)):
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["retry-after"]) >= 1
            assert "queue is full" in refused.json()["detail"]
        assert client.delete(f"/jobs/{waiting.json()['id']}").status_code == 200
        assert client.delete(f"/jobs/{slow}").status_code == 200
        assert job_state(client, slow)["status"] == "cancelled"
        assert client.post("/jobs", json={"task": "text2img", **FAST}).status_code == 202


def test_repeated_request_with_a_seed_comes_from_the_result_cache(client):
    quick = {**FAST, "steps": 2}
    request = {**quick, "seed": 77}
    first = client.post("/text2img", json=request).json()
    again = client.post("/text2img", json=request).json()
    assert first["cached"] is False and again["cached"] is True
    assert again["images"] == first["images"] and again["job_id"] != first["job_id"]
    assert again["timings"]["inference_s"] == 0.0

    as_job = client.post("/jobs", json={"task": "text2img", **request}).json()
    state = job_state(client, as_job["id"])
    assert state["status"] == "succeeded" and state["cached"] is True
    assert state["result"]["images"] == first["images"]

    assert client.post("/text2img", json={**request, "seed": 78}).json()["cached"] is False
    unseeded = [client.post("/text2img", json=quick).json() for _ in range(2)]
    assert not any(answer["cached"] for answer in unseeded)  # no seed: a new image every time
    assert unseeded[0]["images"] != unseeded[1]["images"]
    flush_records(client)
    cached = [job for job in client.get("/jobs", params={"limit": 20}).json()["jobs"] if job["cached"]]
    assert len(cached) == 2


def test_saved_png_metadata_reproduces_the_image_through_the_api(settings):
    # With the result cache off, so the redo really runs the model again.
    with app_client(settings, result_cache_size=0) as client:
        original = client.post("/text2img", json={**FAST, "negative_prompt": "fog", "seed": 123, "save": True})
        assert original.status_code == 200, original.text
        flush_records(client)
        listed = client.get("/images").json()
        assert listed["total"] == 1
        info = listed["images"][0]
        assert info["job_id"] == original.json()["job_id"] and info["seed"] == 123
        png = client.get(info["url"])
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        saved = Image.open(io.BytesIO(png.content))
        assert saved.text["parameters"] == info["parameters"]
        assert saved.text["parameters"].startswith("a red fox\nNegative prompt: fog\nSteps: 4, Sampler: ")
        assert "Seed: 123, Size: 64x64, Model: demo" in saved.text["parameters"]
        assert (settings.output_dir / info["file"]).is_file()
        assert hashlib.sha256(png.content).hexdigest() == info["sha256"]

        request = json.loads(saved.text["sdserve"])["request"]
        redo = client.post("/jobs", json=request).json()
        result = wait_for(lambda: (s := job_state(client, redo["id"]))["status"] == "succeeded" and s)["result"]
        assert result["cached"] is False
        assert result["images"] == original.json()["images"]  # the same PNG bytes as the first answer
        assert from_b64(result["images"][0]).tobytes() == saved.convert("RGB").tobytes()


def test_images_are_saved_only_when_asked_and_listed_with_filters(settings):
    with app_client(settings, save_images=False) as client:
        assert client.post("/text2img", json={**FAST, "prompt": "unsaved"}).status_code == 200
        assert client.post("/text2img", json={**FAST, "prompt": "two foxes", "number_of_images": 2,
                                              "save": True}).status_code == 200
        assert client.post("/text2img", json={**FAST, "prompt": "a 100% cat", "save": True}).status_code == 200
        flush_records(client)
        everything = client.get("/images").json()
        assert everything["total"] == 3 and {image["prompt"] for image in everything["images"]} == {
            "two foxes", "a 100% cat"}
        assert client.get("/images", params={"prompt": "FOX"}).json()["total"] == 2
        assert client.get("/images", params={"prompt": "0%"}).json()["total"] == 1
        assert client.get("/images", params={"model": "demo", "limit": 1, "offset": 2}).json()["total"] == 3
        assert len(client.get("/images", params={"limit": 1, "offset": 2}).json()["images"]) == 1
        assert client.get("/images", params={"model": "nope"}).json()["total"] == 0
        assert len(list((settings.output_dir / "images").rglob("*.png"))) == 3

        job = client.get("/jobs", params={"limit": 1}).json()["jobs"][0]
        assert job["prompt"] == "a 100% cat" and len(job["images"]) == 1
        assert client.get(job["images"][0]["url"]).status_code == 200
        assert client.get("/images/" + "0" * 32).status_code == 404
        assert client.get("/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)


@pytest.mark.slow
def test_jobs_running_at_shutdown_are_interrupted_and_kept(settings):
    with app_client(settings) as client:
        done = client.post("/text2img", json={**FAST, "seed": 1, "save": True}).json()["job_id"]
        gate = StepGate(client, SLOW["prompt"])
        slow = client.post("/jobs", json=SLOW).json()["id"]
        queued = client.post("/jobs", json={"task": "text2img", **FAST}).json()["id"]
        gate.wait_reached()
    # The app stopped with one job running and one waiting; a new one on the same data folder remembers them.
    with app_client(settings) as client:
        for job_id in (slow, queued):
            state = job_state(client, job_id)
            assert state["status"] == "interrupted" and "shutting down" in state["error"]
        kept = job_state(client, done)
        assert kept["status"] == "succeeded" and from_b64(kept["result"]["images"][0]).size == (64, 64)
