"""End-to-end: the real app in a uvicorn subprocess, driven over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from scripts.lockfile import mismatches
from tests.conftest import ROOT, server_env
from tests.utils import free_port, from_b64, gradient_image, half_mask, pixels, to_b64, wait_until_healthy


def test_health_docs_and_models(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["loaded_models"] == ["demo"]
    assert "euler_a" in health["schedulers"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert {"/text2img", "/img2img", "/inpainting", "/models", "/models/{name}", "/health"} <= set(paths)
    models = httpx.get(f"{server.url}/models").json()
    assert models["default"] == "demo"
    assert [m["name"] for m in models["models"] if m["loaded"]] == ["demo"]
    demo = httpx.get(f"{server.url}/models/demo").json()
    assert demo["kind"] == "base" and demo["source"] == "demo:tiny"
    missing = httpx.get(f"{server.url}/models/nope")
    assert missing.status_code == 404 and "demo" in missing.json()["detail"]


def test_the_readme_request(server):
    body = {"prompt": "a red fox", "width": 256, "height": 256, "steps": 20, "seed": 7}
    response = httpx.post(f"{server.url}/text2img", json=body, timeout=60)
    assert response.status_code == 200, response.text
    image = from_b64(response.json()["images"][0])
    assert (image.format, image.size) == ("PNG", (256, 256))
    again = httpx.post(f"{server.url}/text2img/", json=body, timeout=60).json()
    assert again["images"][0] == response.json()["images"][0]


def test_img2img_and_inpainting_over_http(server):
    source = gradient_image(96, 96)
    close = httpx.post(
        f"{server.url}/img2img/",
        json={"prompt": "x", "image": to_b64(source), "strength": 0.05, "steps": 20, "seed": 2},
        timeout=60,
    ).json()
    assert np.abs(pixels(from_b64(close["images"][0])) - pixels(source)).mean() < 12
    painted = httpx.post(
        f"{server.url}/inpainting/",
        json={"prompt": "x", "image": to_b64(source), "mask_image": to_b64(half_mask(96, 96)), "steps": 6},
        timeout=60,
    ).json()
    result = pixels(from_b64(painted["images"][0]))
    assert np.abs(result[:, :44] - pixels(source)[:, :44]).mean() < 2


def test_errors_over_http_leave_the_server_working(server):
    bad = [
        ({"prompt": "x", "model": "nope"}, 404),
        ({"prompt": "x", "width": 100}, 422),
        ({"prompt": "x", "steps": 10_000}, 422),
        ({"prompt": "x", "number_of_images": 99}, 422),
    ]
    for body, status in bad:
        response = httpx.post(f"{server.url}/text2img", json=body, timeout=30)
        assert response.status_code == status, response.text
        assert isinstance(response.json()["detail"], str)
    image_error = httpx.post(f"{server.url}/img2img", json={"prompt": "x", "image": "nope!"}, timeout=30)
    assert image_error.status_code == 422 and "base64" in image_error.json()["detail"]
    ok = httpx.post(f"{server.url}/text2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64}, timeout=30)
    assert ok.status_code == 200


def test_two_concurrent_requests_both_get_their_own_result(server):
    bodies = [{"prompt": f"prompt {i}", "steps": 10, "width": 128, "height": 128, "seed": 100 + i} for i in range(2)]
    expected = [httpx.post(f"{server.url}/text2img", json=b, timeout=60).json()["images"][0] for b in bodies]
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda b: httpx.post(f"{server.url}/text2img", json=b, timeout=60), bodies))
    assert [r.status_code for r in responses] == [200, 200]
    assert [r.json()["images"][0] for r in responses] == expected
    assert expected[0] != expected[1]


@pytest.mark.slow
def test_run_api_script_serves_and_stops(tmp_path: Path, model_cache: Path):
    """The README's command: ./run_api.sh reuses the environment and serves on $PORT."""
    port = free_port()
    env = server_env(tmp_path, model_cache, PORT=str(port), HOST="127.0.0.1")
    env.pop("PYTHONPATH")
    log = open(tmp_path / "run_api.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(["./run_api.sh"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", timeout_s=300)
        body = {"prompt": "a red fox", "width": 256, "height": 256, "steps": 20, "seed": 7}
        response = httpx.post(f"http://127.0.0.1:{port}/text2img", json=body, timeout=60)
        assert response.status_code == 200
        assert from_b64(response.json()["images"][0]).size == (256, 256)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
        log.close()
    assert process.returncode is not None
    time.sleep(0.2)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    # The test environment already holds every pin the server needs: run_api.sh must not re-sync it away.
    assert mismatches(ROOT / "requirements-dev.lock") == []
