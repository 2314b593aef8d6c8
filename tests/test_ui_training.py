"""The page's training view in a real headless Chromium against a real server that trains: a dataset uploaded
from the page, a run started with the form's options, its progress bar, live loss curve and validation images,
cancelled; a second run's LoRA lands in the generation form's LoRA list.

The screenshot lands in test-artifacts/ui-training.png (ignored by git, kept by CI)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess, server_env
from tests.training_helpers import shapes_dataset

sync_api = pytest.importorskip("playwright.sync_api", reason="pip package playwright is not installed")

CHROMIUM = os.environ.get("SDSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CPU_LAUNCH = '["--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", ' \
             '"--dynamo_backend", "no"]'
# Training starts a process that loads the model first: generous on a shared machine.
TIMEOUT_MS = 240_000

sync_api.expect.set_options(timeout=TIMEOUT_MS)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)),
                       reason=f"no Chromium at {CHROMIUM}; run scripts/install_browser.sh"),
]


@pytest.fixture(scope="module")
def training_server(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("training-server")
    env = server_env(folder, model_cache, SDSERVE_DATASETS_DIR=str(folder / "datasets"),
                     SDSERVE_TRAINING_LAUNCH_ARGS=CPU_LAUNCH, SDSERVE_TRAINING_ACCELERATE_CONFIG="none.yaml",
                     SDSERVE_PRELOAD_DEFAULT_MODEL="false", SDSERVE_TRAINING_STOP_TIMEOUT_S="60",
                     OMP_NUM_THREADS="1")
    server = ServerProcess(env, folder / "server.log")
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture
def page(training_server) -> Iterator[sync_api.Page]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1400})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(training_server.url + "/")
        sync_api.expect(page.locator("#train-base option[value=demo]")).to_have_count(1, timeout=60_000)
        yield page
        browser.close()
        assert not errors, f"JavaScript errors on the page: {errors}"


def fill_run(page, steps: int, register: str, every: int) -> None:
    page.fill("#train-steps", str(steps))
    page.fill("#train-resolution", "64")
    page.fill("#train-batch", "2")
    page.fill("#train-lr", "0.01")
    page.fill("#train-checkpoint", str(every))
    page.fill("#train-validation-steps", str(every))
    page.fill("#train-seed", "1")
    page.fill("#train-register", register)
    page.fill("#train-validation-prompt", "a red square")


def blue_pixels(page) -> int:
    """Pixels of the loss line (the page's accent blue) on the chart's canvas."""
    return page.evaluate("""() => {
        const canvas = document.getElementById('loss-chart');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let count = 0;
        for (let i = 0; i < data.length; i += 4) {
            if (data[i + 2] > 150 && data[i] < 120 && data[i + 3] > 100) count++;
        }
        return count;
    }""")


def test_training_view_uploads_trains_shows_progress_and_cancels_and_lists_the_lora(page, training_server,
                                                                                     tmp_path):
    expect = sync_api.expect
    # Upload: the shapes, with .txt captions, picked as files.
    folder = shapes_dataset(tmp_path / "shapes", layout="captions")
    page.click("#dataset-upload summary")
    page.set_input_files("#dataset-files", sorted(str(path) for path in folder.iterdir()))
    page.fill("#dataset-name", "page-shapes")
    page.click("#dataset-send")
    expect(page.locator("#dataset-status")).to_contain_text("stored page-shapes")
    expect(page.locator("#train-dataset")).to_have_value("page-shapes")
    listed = httpx.get(f"{training_server.url}/datasets/page-shapes", timeout=30).json()
    assert listed["images"] == 8 and listed["captioned"] == 8

    # A long run: progress, the loss curve, a validation image; then cancelled.
    fill_run(page, steps=200, register="page-never", every=2)  # one loss point a step (200 / 200)
    page.click("#train-start")
    expect(page.locator("#train-cancel")).to_be_enabled()
    expect(page.locator("#train-status")).to_contain_text("step ")
    page.wait_for_function("() => Number(document.getElementById('loss-chart').dataset.points) >= 3")
    assert blue_pixels(page) > 50  # a line drawn, not only the frame
    validation = page.locator("#train-validation img").first
    expect(validation).to_be_visible()
    page.wait_for_function("() => document.querySelector('#train-validation img').naturalWidth === 64")
    assert 0 < page.eval_on_selector("#train-progress", "bar => bar.value") < 200
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "ui-training.png"), full_page=True)

    page.click("#train-cancel")
    expect(page.locator("#train-status")).to_contain_text("cancelled at step")
    expect(page.locator("#train-start")).to_be_enabled()
    run_id = page.text_content("#train-id")
    run = httpx.get(f"{training_server.url}/train/{run_id}", timeout=30).json()
    assert run["state"] == "cancelled" and run["resumable"] and run["registered_as"] is None
    assert run["options"]["rank"] == 4 and run["options"]["resolution"] == 64
    assert page.locator("#lora-names option[value=page-never]").count() == 0

    # A short run to the end: its LoRA is offered by the generation form.
    fill_run(page, steps=4, register="page-lora", every=100)
    page.click("#train-start")
    expect(page.locator("#train-status")).to_contain_text('succeeded at step 4 of 4')
    expect(page.locator("#lora-names option[value=page-lora]")).to_have_count(1)
    assert page.locator("#train-validation img").count() >= 1  # the final validation
