"""The jobs API against a real server process: live event streams, disconnecting clients, restarts."""

from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image

from tests.conftest import ServerProcess, server_env
from tests.utils import from_b64, parse_sse, wait_for

FAST = {"prompt": "a red fox", "steps": 3, "width": 64, "height": 64}
SLOW = {"prompt": "a slow one", "steps": 150, "width": 384, "height": 384}


def stream_events(base_url: str, job_id: str, on_event=None, timeout_s: float = 120) -> list[tuple[str, dict]]:
    """Read a job's event stream as it comes, calling on_event(kind, data) on each; stops at the stream's end."""
    events: list[tuple[str, dict]] = []
    with httpx.stream("GET", f"{base_url}/jobs/{job_id}/events", timeout=timeout_s) as response:
        assert response.status_code == 200
        buffer = ""
        for chunk in response.iter_text():
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                for kind, data in parse_sse(block + "\n\n"):
                    events.append((kind, data))
                    if on_event is not None:
                        on_event(kind, data)
    return events


def job_state(base_url: str, job_id: str) -> dict:
    return httpx.get(f"{base_url}/jobs/{job_id}", timeout=30).json()


def test_events_stream_live_in_order_and_end_with_the_result(server):
    job_id = httpx.post(f"{server.url}/jobs", json={"task": "text2img", **FAST, "steps": 8, "width": 96,
                                                    "height": 96, "seed": 4}).json()["id"]
    seen_while_running: list[str] = []

    def on_event(kind: str, data: dict) -> None:
        if kind == "progress" and data["step"] == 1:
            # Delivered as it happens: the job is still running when its first step arrives.
            seen_while_running.append(job_state(server.url, job_id)["status"])

    events = stream_events(server.url, job_id, on_event)
    kinds = [kind for kind, _ in events]
    assert kinds[0] in ("queued", "started")
    assert kinds.index("started") < kinds.index("progress")
    assert [data["step"] for kind, data in events if kind == "progress"] == list(range(1, 9))
    assert kinds[-1] == "done" and kinds.count("done") == 1
    assert seen_while_running == ["running"]
    result = events[-1][1]["result"]
    assert result["job_id"] == job_id and result["seeds"] == [4]
    assert from_b64(result["images"][0]).size == (96, 96)
    assert result == job_state(server.url, job_id)["result"]


def test_late_stream_gets_the_current_state_then_follows_to_the_cancel(server):
    slow = httpx.post(f"{server.url}/jobs", json={"task": "text2img", **SLOW}).json()["id"]
    queued = httpx.post(f"{server.url}/jobs", json={"task": "text2img", **FAST}).json()["id"]
    wait_for(lambda: job_state(server.url, slow)["step"] >= 2, timeout_s=120)

    def cancel_when_replayed(kind: str, data: dict) -> None:
        if kind == "queued":
            httpx.delete(f"{server.url}/jobs/{queued}", timeout=30)

    waiting = stream_events(server.url, queued, cancel_when_replayed)
    assert [(kind, data.get("position")) for kind, data in waiting] == [("queued", 1), ("cancelled", None)]

    def cancel_on_first_live_step(kind: str, data: dict) -> None:
        if kind == "progress" and not cancel_on_first_live_step.sent:
            cancel_on_first_live_step.sent = True
            httpx.delete(f"{server.url}/jobs/{slow}", timeout=30)

    cancel_on_first_live_step.sent = False
    events = stream_events(server.url, slow, cancel_on_first_live_step)
    kinds = [kind for kind, _ in events]
    assert kinds[:2] == ["started", "progress"] and events[1][1]["step"] >= 2  # the replay of where it is
    assert kinds[-1] == "cancelled" and "done" not in kinds
    assert job_state(server.url, slow)["status"] == "cancelled"


def test_a_synchronous_client_that_disconnects_cancels_its_job(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/text2img", json=SLOW, timeout=httpx.Timeout(30, read=3))
    cancelled = wait_for(
        lambda: (jobs := httpx.get(f"{server.url}/jobs", params={"status": "cancelled"}).json()["jobs"])
        and jobs[0]["prompt"] == "a slow one" and jobs[0]["finished_at"] and jobs[0],
        timeout_s=30,
    )
    assert cancelled["step"] < 150
    started = time.monotonic()
    answer = httpx.post(f"{server.url}/text2img", json=FAST, timeout=60)
    assert answer.status_code == 200 and answer.json()["timings"]["queued_s"] < 1.0
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_records_survive_a_killed_server_and_its_jobs_show_interrupted(tmp_path, model_cache):
    env = server_env(tmp_path, model_cache)
    first = ServerProcess(env, tmp_path / "first.log")
    try:
        first.wait_healthy()
        done = httpx.post(f"{first.url}/text2img", json={**FAST, "seed": 8, "save": True}, timeout=60).json()
        slow = httpx.post(f"{first.url}/jobs", json={"task": "text2img", **SLOW}).json()["id"]
        queued = httpx.post(f"{first.url}/jobs", json={"task": "text2img", **FAST}).json()["id"]
        wait_for(lambda: job_state(first.url, slow)["step"] >= 1, timeout_s=120)
        first.process.kill()  # no shutdown code runs: the database still says running and queued
        first.process.wait()
    finally:
        first.stop()

    second = ServerProcess(env, tmp_path / "second.log")
    try:
        second.wait_healthy()
        for job_id in (slow, queued):
            state = job_state(second.url, job_id)
            assert state["status"] == "interrupted", state
            assert state["error"] == "the server stopped before this job finished"
            assert [kind for kind, _ in stream_events(second.url, job_id)] == ["error"]
        kept = job_state(second.url, done["job_id"])
        assert kept["status"] == "succeeded" and kept["result"]["images"] == done["images"]
        image = httpx.get(f"{second.url}{kept['images'][0]['url']}")
        assert image.status_code == 200
        assert Image.open(io.BytesIO(image.content)).tobytes() == from_b64(done["images"][0]).tobytes()
        listed = httpx.get(f"{second.url}/jobs").json()
        assert {job["id"] for job in listed["jobs"]} >= {slow, queued, done["job_id"]}
    finally:
        second.stop()
