"""Micro-batching: compatible requests waiting together share one pipeline call, each with its own seed, progress,
cancel and answer; incompatible ones run alone."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from fastapi.testclient import TestClient

from api.app import create_app
from models.settings import Settings
from tests.conftest import wait_ready
from tests.utils import StepGate, from_b64, parse_sse, pixels, wait_for

BODY = {"task": "text2img", "steps": 6, "width": 64, "height": 64}
HOLD = {**BODY, "prompt": "hold the worker", "seed": 99, "steps": 3}
PROMPTS = [("a red fox", 1), ("a blue cat", 2), ("a green tree", 3)]


@contextmanager
def app_client(settings: Settings, **overrides) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"result_cache_size": 0, **overrides}))) as client:
        wait_ready(client)
        yield client


def queue_behind_a_held_job(client: TestClient, bodies: list[dict]) -> tuple[StepGate, list[str]]:
    """Hold the worker on one job, queue `bodies` behind it: once the gate opens they are all waiting together."""
    gate = StepGate(client, HOLD["prompt"])
    client.post("/jobs", json=HOLD)
    gate.wait_reached()
    return gate, [client.post("/jobs", json=body).json()["id"] for body in bodies]


def finished(client: TestClient, job_id: str) -> dict:
    return wait_for(lambda: (state := client.get(f"/jobs/{job_id}").json())["status"] not in ("queued", "running")
                    and state)


def test_waiting_compatible_requests_share_one_call_and_match_their_solo_images(settings):
    bodies = [{**BODY, "prompt": prompt, "seed": seed} for prompt, seed in PROMPTS]
    bodies[1]["number_of_images"] = 2
    with app_client(settings) as client:
        gate, ids = queue_behind_a_held_job(client, bodies)
        gate.open()
        batched = [finished(client, job_id)["result"] for job_id in ids]
    assert [result["timings"]["batch_images"] for result in batched] == [4, 4, 4]
    assert [result["seeds"] for result in batched] == [[1], [2, 3], [3]]
    with app_client(settings, batch_max_images=1) as client:
        solo = [client.post("/text2img", json={k: v for k, v in body.items() if k != "task"}).json()
                for body in bodies]
    assert all("batch_images" not in result["timings"] for result in solo)
    for together, alone in zip(batched, solo, strict=True):
        assert together["parameters"] == alone["parameters"]
        for mine, reference in zip(together["images"], alone["images"], strict=True):
            difference = np.abs(pixels(from_b64(mine)) - pixels(from_b64(reference)))
            # Identical but for float rounding in a few pixels: CPU kernels sum in another order for another
            # batch size (README, Micro-batching).
            assert difference.max() <= 2 and (difference > 0).mean() < 0.02
    assert batched[0]["images"] != batched[2]["images"]


def test_cancelling_one_request_of_a_batch_leaves_the_others_running(settings):
    bodies = [{**BODY, "prompt": prompt, "seed": seed, "steps": 12} for prompt, seed in PROMPTS]
    with app_client(settings) as client:
        gate, ids = queue_behind_a_held_job(client, bodies)
        inner = StepGate(client, "a blue cat")  # holds the batch at its first step
        gate.open()
        inner.wait_reached()
        stopping = client.delete(f"/jobs/{ids[0]}")
        inner.open()
        assert stopping.status_code in (200, 202)
        cancelled = finished(client, ids[0])
        assert cancelled["status"] == "cancelled" and 1 <= cancelled["step"] < 12
        for job_id in ids[1:]:
            done = finished(client, job_id)
            assert done["status"] == "succeeded" and done["result"]["timings"]["batch_images"] == 3
        kinds = [kind for kind, _ in parse_sse(client.get(f"/jobs/{ids[0]}/events").text)]
        assert kinds == ["cancelled"]


def test_incompatible_requests_run_alone(settings):
    bodies = [{**BODY, "prompt": "a", "seed": 1}, {**BODY, "prompt": "b", "seed": 2, "steps": 5},
              {**BODY, "prompt": "c", "seed": 3, "width": 128}]
    with app_client(settings) as client:
        gate, ids = queue_behind_a_held_job(client, bodies)
        gate.open()
        results = [finished(client, job_id)["result"] for job_id in ids]
    assert all("batch_images" not in result["timings"] for result in results)


def test_batching_off_runs_each_request_alone(settings):
    bodies = [{**BODY, "prompt": prompt, "seed": seed} for prompt, seed in PROMPTS]
    with app_client(settings, batch_max_images=1) as client:
        gate, ids = queue_behind_a_held_job(client, bodies)
        gate.open()
        assert all("batch_images" not in finished(client, job_id)["result"]["timings"] for job_id in ids)
