"""GET /stats, GET /metrics and request ids, in process and against a real server's log."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models import system_stats
from tests.utils import StepGate

FAST = {"steps": 3, "width": 64, "height": 64}


def scrape(client) -> dict[tuple[str, frozenset], float]:
    """GET /metrics parsed by Prometheus' own parser: {(sample name, labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- /stats ---------------------------------------------------------------------------------------------------
def test_stats_has_seed_003_shape(client):
    response = client.get("/stats")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"cpu_ram", "gpu"}
    ram = body["cpu_ram"]
    assert set(ram) == {"total", "available", "percent", "used", "free"}
    assert ram["total"] > 0
    assert 0 <= ram["available"] <= ram["total"]
    assert 0 <= ram["free"] <= ram["total"]
    assert 0 <= ram["percent"] <= 100
    # This machine has no GPU: the list is there and empty, as seed 003 answered.
    assert body["gpu"] == [] if not torch.cuda.is_available() else len(body["gpu"]) == torch.cuda.device_count()


def _fake_cuda(monkeypatch, nvml: bool) -> None:
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name=f"Fake GPU {i}", total_memory=16 * gib)
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (12 * gib, 16 * gib))
    if nvml:
        monkeypatch.setattr(torch.cuda, "device_memory_used", lambda i: (i + 1) * gib)
        monkeypatch.setattr(torch.cuda, "utilization", lambda i: 40 + i)
    else:
        def no_nvml(i):
            raise ModuleNotFoundError("nvidia-ml-py does not seem to be installed")

        monkeypatch.setattr(torch.cuda, "device_memory_used", no_nvml)
        monkeypatch.setattr(torch.cuda, "utilization", no_nvml)


def test_stats_reports_each_gpu_from_nvml(monkeypatch):
    _fake_cuda(monkeypatch, nvml=True)
    gpus = system_stats.system_stats()["gpu"]
    assert gpus == [
        {"id": 0, "name": "Fake GPU 0", "load": 0.4, "memoryTotal": 16384.0, "memoryUsed": 1024.0,
         "memoryFree": 15360.0},
        {"id": 1, "name": "Fake GPU 1", "load": 0.41, "memoryTotal": 16384.0, "memoryUsed": 2048.0,
         "memoryFree": 14336.0},
    ]


def test_stats_without_nvml_reads_memory_and_leaves_load_unknown(monkeypatch):
    _fake_cuda(monkeypatch, nvml=False)
    gpu = system_stats.system_stats()["gpu"][0]
    assert gpu["load"] is None
    assert (gpu["memoryTotal"], gpu["memoryUsed"], gpu["memoryFree"]) == (16384.0, 4096.0, 12288.0)


# -- /metrics -------------------------------------------------------------------------------------------------
def test_metrics_parse_and_count_requests_by_route(client):
    before = scrape(client)
    assert client.get("/stats").status_code == 200
    assert client.get("/models/no-such-model").status_code == 404
    after = scrape(client)
    stats_ok = {"method": "GET", "route": "/stats", "status": "200"}
    assert value(after, "sdserve_http_requests_total", **stats_ok) == value(
        before, "sdserve_http_requests_total", **stats_ok) + 1
    # The route template, not the path: one series however many names are asked for.
    missing = {"method": "GET", "route": "/models/{name}", "status": "404"}
    assert value(after, "sdserve_http_requests_total", **missing) == value(
        before, "sdserve_http_requests_total", **missing) + 1
    latency = {"method": "GET", "route": "/stats"}
    assert value(after, "sdserve_http_request_duration_seconds_count", **latency) == value(
        before, "sdserve_http_request_duration_seconds_count", **latency) + 1
    assert value(after, "sdserve_http_request_duration_seconds_sum", **latency) > value(
        before, "sdserve_http_request_duration_seconds_sum", **latency)


def test_metrics_count_jobs_steps_and_model_loads(client):
    before = scrape(client)
    assert client.post("/text2img", json={"prompt": "a fox", **FAST}).status_code == 200
    assert client.post("/text2img", json={"prompt": "a fox", "steps": 100_000}).status_code == 422
    after = scrape(client)
    assert value(after, "sdserve_jobs_submitted_total", task="text2img") == value(
        before, "sdserve_jobs_submitted_total", task="text2img") + 1
    assert value(after, "sdserve_jobs_finished_total", status="succeeded") == value(
        before, "sdserve_jobs_finished_total", status="succeeded") + 1
    assert value(after, "sdserve_denoising_steps_total", model="demo") == value(
        before, "sdserve_denoising_steps_total", model="demo") + FAST["steps"]
    assert value(after, "sdserve_denoising_steps_per_second", model="demo") > 0
    assert value(after, "sdserve_model_loads_total", model="demo") >= 1
    assert value(after, "sdserve_jobs_running") == 0
    assert value(after, "sdserve_queue_depth") == 0
    assert value(after, "sdserve_queue_capacity") == client.app.state.settings.queue_size


def test_metrics_show_queue_depth_running_and_cancelled_jobs(client):
    before = scrape(client)
    gate = StepGate(client, "slow")
    slow = {"task": "text2img", "prompt": "slow", "steps": 20, "width": 64, "height": 64}
    running = client.post("/jobs", json=slow).json()["id"]
    gate.wait_reached()
    # Other steps: it cannot join the running job's batch, so it waits in the queue.
    waiting = client.post("/jobs", json={**slow, "steps": 21}).json()["id"]
    during = scrape(client)
    for job_id in (waiting, running):
        assert client.delete(f"/jobs/{job_id}").status_code == 200
    after = scrape(client)
    assert value(during, "sdserve_queue_depth") == 1
    assert value(during, "sdserve_jobs_running") == 1
    assert value(after, "sdserve_queue_depth") == 0
    assert value(after, "sdserve_jobs_running") == 0
    assert value(after, "sdserve_jobs_finished_total", status="cancelled") == value(
        before, "sdserve_jobs_finished_total", status="cancelled") + 2
    assert value(after, "sdserve_jobs_submitted_total", task="text2img") == value(
        before, "sdserve_jobs_submitted_total", task="text2img") + 2


def test_metrics_count_model_switches_and_evictions(client):
    registered = client.post("/models", json={"name": "demo-copy", "kind": "base", "source": "demo:tiny"})
    assert registered.status_code == 201, registered.text
    before = scrape(client)
    for model in ("demo-copy", "demo"):
        response = client.post("/text2img", json={"prompt": "a fox", "model": model, **FAST})
        assert response.status_code == 200, response.text
    assert client.delete("/models/demo-copy").status_code == 204
    after = scrape(client)
    for model in ("demo-copy", "demo"):
        assert value(after, "sdserve_model_switches_total", model=model) == value(
            before, "sdserve_model_switches_total", model=model) + 1
    assert value(after, "sdserve_model_loads_total", model="demo-copy") == value(
        before, "sdserve_model_loads_total", model="demo-copy") + 1
    assert value(after, "sdserve_model_evictions_total", model="demo-copy") == value(
        before, "sdserve_model_evictions_total", model="demo-copy") + 1
    assert value(after, "sdserve_models_loaded") == 1


# -- request ids ------------------------------------------------------------------------------------------------
def test_request_id_is_echoed_or_made(client):
    assert client.get("/health", headers={"X-Request-ID": "client-id-1"}).headers["x-request-id"] == "client-id-1"
    made = client.get("/health").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert client.get("/health").headers["x-request-id"] != made
    # Errors carry it too, so a user can quote it when reporting one.
    assert client.get("/nope", headers={"X-Request-ID": "on-a-404"}).headers["x-request-id"] == "on-a-404"


@pytest.mark.parametrize("unsafe", ["has spaces in it", "x" * 129, "quote\"d", "semi;colon"])
def test_unsafe_request_id_is_replaced(client, unsafe):
    echoed = client.get("/health", headers={"X-Request-ID": unsafe}).headers["x-request-id"]
    assert echoed != unsafe
    assert re.fullmatch(r"[0-9a-f]{32}", echoed)


def test_server_log_lines_carry_request_and_job_ids(server):
    response = httpx.post(f"{server.url}/text2img", json={"prompt": "a fox", **FAST},
                          headers={"X-Request-ID": "trace-me-42"}, timeout=60)
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-me-42"
    job_id = response.json()["job_id"]
    # The access line is written once the answer has gone out, so it may land a moment after we have it.
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in server.log_path.read_text().splitlines() if "req=trace-me-42" in line]
        if any("api.access" in line for line in lines) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    # Logged on the event loop (queued, access line) and on the worker thread (done), all with the id.
    assert any("models.engine.worker" in line and f"job {job_id} queued" in line for line in lines), lines
    assert any("models.engine.worker" in line and f"job={job_id}" in line and "done" in line for line in lines), lines
    assert any("api.access" in line and "POST /text2img -> 200" in line for line in lines), lines
