"""The page at GET /, driven in a real headless Chromium (Debian's, through Playwright) against a real server.

Screenshots land in test-artifacts/ (ignored by git, kept by CI as artifacts).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.utils import gradient_image, pixels

sync_api = pytest.importorskip("playwright.sync_api", reason="pip package playwright is not installed")

CHROMIUM = os.environ.get("SDSERVE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)),
        reason=f"no Chromium at {CHROMIUM}; run scripts/install_browser.sh",
    ),
]


# Generous: the CI machine may be slow and shared; a passing test does not wait for it.
sync_api.expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, server) -> Iterator[sync_api.Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server.url + "/")
    # The model list comes from GET /models: the page is usable once it is filled.
    sync_api.expect(page.locator("#model option[value=demo]")).to_have_count(1)
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def record_status_texts(page) -> None:
    """Keep every text the status line shows, to check what the user saw while the job ran."""
    page.evaluate("""() => {
        window.statusTexts = [];
        new MutationObserver(() => window.statusTexts.push(document.getElementById('job-status').textContent))
            .observe(document.getElementById('job-status'), {childList: true, characterData: true, subtree: true});
    }""")


def image_from_src(page, selector: str) -> Image.Image:
    source = page.eval_on_selector(selector, "image => image.src")
    header, data = source.split(",", 1)
    assert header.startswith("data:image/png;base64")
    return Image.open(io.BytesIO(base64.b64decode(data)))


def fill_common(page, prompt: str, steps: int, seed: int, size: int) -> None:
    page.fill("#prompt", prompt)
    page.fill("#steps", str(steps))
    page.fill("#seed", str(seed))
    page.fill("#width", str(size))
    page.fill("#height", str(size))


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_page_generates_with_progress_and_shows_images(page, server):
    fill_common(page, "a lighthouse on a cliff, oil painting", steps=8, seed=1234, size=128)
    page.fill("#negative_prompt", "blurry")
    page.fill("#cfg_scale", "6.5")
    page.fill("#number_of_images", "2")
    page.select_option("#model", "demo")
    record_status_texts(page)

    page.click("#generate")
    sync_api.expect(page.locator("#job-status")).to_have_text(re.compile(r"^Done"))

    steps_seen = [int(m.group(1)) for text in page.evaluate("window.statusTexts")
                  if (m := re.fullmatch(r"Step (\d+) of 8", text))]
    assert steps_seen, page.evaluate("window.statusTexts")
    assert steps_seen == sorted(steps_seen) and steps_seen[-1] == 8
    assert page.eval_on_selector("#progress", "bar => [bar.value, bar.max]") == [8, 8]

    results = page.locator("img.result-image")
    sync_api.expect(results).to_have_count(2)
    for index in range(2):
        image = image_from_src(page, f"#results figure:nth-child({index + 1}) img")
        assert image.size == (128, 128)
    sync_api.expect(page.locator("#results figcaption span")).to_have_text(["seed 1234", "seed 1235"])
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")

    # The gallery reloads after a job; the new images are served by GET /images/{id}.
    gallery = page.locator("#gallery img")
    sync_api.expect(gallery.first).to_be_visible()
    assert gallery.count() >= 2
    first_url = page.eval_on_selector("#gallery img", "image => image.src")
    assert httpx.get(first_url, timeout=10).headers["content-type"].startswith("image/")
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].every(i => i.naturalWidth > 0)")
    screenshot(page, "ui-generated.png")


def test_page_cancels_a_running_job_and_the_worker_is_free_after(page, server):
    fill_common(page, "a very long job", steps=150, seed=7, size=256)
    page.click("#generate")
    sync_api.expect(page.locator("#job-status")).to_have_text(re.compile(r"^Step \d+ of 150"))
    assert page.is_enabled("#cancel")
    # The server sends a small preview every few steps of a watched job; the page shows it while it runs.
    sync_api.expect(page.locator("#preview")).to_be_visible()
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    screenshot(page, "ui-running.png")
    page.click("#cancel")

    sync_api.expect(page.locator("#job-status")).to_have_text("Cancelled.")
    assert page.locator("img.result-image").count() == 0
    assert page.is_hidden("#preview")
    assert page.is_enabled("#generate")
    screenshot(page, "ui-cancelled.png")

    job_id = page.text_content("#job-id").removeprefix("job ").strip()
    job = httpx.get(f"{server.url}/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "cancelled"
    assert job["step"] < 150

    # The device is free at once: a short job from the same page finishes.
    fill_common(page, "right after", steps=3, seed=8, size=64)
    page.click("#generate")
    sync_api.expect(page.locator("#job-status")).to_have_text(re.compile(r"^Done"), timeout=20_000)
    sync_api.expect(page.locator("img.result-image")).to_have_count(1)


def test_page_inpaints_the_area_painted_with_the_mouse(page, server, tmp_path):
    source = gradient_image(128, 128)
    upload = tmp_path / "input.png"
    source.save(upload)

    page.check("input[name=task][value=inpainting]")
    assert page.is_enabled("#strength")
    page.set_input_files("#input-image", str(upload))
    sync_api.expect(page.locator("#mask-tools")).to_be_visible()
    page.fill("#brush-size", "60")

    # Paint the right half of the image: strokes top to bottom, close enough to overlap.
    box = page.locator("#mask-canvas").bounding_box()
    assert box is not None
    for fraction in (0.6, 0.75, 0.9):
        page.mouse.move(box["x"] + box["width"] * fraction, box["y"] + 2)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * fraction, box["y"] + box["height"] - 2, steps=8)
        page.mouse.up()
    fill_common(page, "a red door", steps=4, seed=3, size=128)
    page.click("#generate")
    sync_api.expect(page.locator("#job-status")).to_have_text(re.compile(r"^Done"))

    result = pixels(image_from_src(page, "img.result-image"))
    original = pixels(source)
    # Left of every stroke the picture is kept exactly; under the strokes it was repainted.
    assert np.array_equal(result[:, :40], original[:, :40])
    assert np.abs(result[:, 90:110] - original[:, 90:110]).mean() > 5
    screenshot(page, "ui-inpainting.png")


def test_page_shows_the_servers_reason_for_a_bad_request(page):
    fill_common(page, "a fox", steps=4, seed=1, size=64)
    page.fill("#width", "100")  # not a multiple of 8: the API answers 422 and says which field
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_contain_text("width")
    sync_api.expect(page.locator("#error")).to_contain_text("multiple of 8")
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")

    # A task that needs an image says so before anything is sent.
    page.check("input[name=task][value=img2img]")
    page.fill("#width", "")
    page.click("#generate")
    sync_api.expect(page.locator("#error")).to_have_text("Choose an input image for img2img.")


UI_KEY = "page-key-0123456789"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory, model_cache) -> Iterator:
    from tests.conftest import ServerProcess, server_env

    folder = tmp_path_factory.mktemp("keyed-server")
    process = ServerProcess(server_env(folder, model_cache, SDSERVE_API_KEYS=UI_KEY), folder / "server.log")
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def test_page_works_on_a_server_with_api_keys(browser, keyed_server):
    """The key typed at the top is kept in the browser and sent with every request: the model list, the job, its
    event stream and the gallery's image files (fetched with the key, as an <img src> cannot send one)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(keyed_server.url + "/")
    sync_api.expect(page.locator("#server-status")).to_contain_text("API key is needed")
    assert page.locator("#model option").count() == 0

    page.fill("#api-key", "not-the-key")
    page.click("#save-key")
    sync_api.expect(page.locator("#server-status")).to_contain_text("not accepted")

    page.fill("#api-key", UI_KEY)
    page.click("#save-key")
    sync_api.expect(page.locator("#model option[value=demo]")).to_have_count(1)
    assert page.evaluate("localStorage.getItem('sdserve-api-key')") == UI_KEY

    fill_common(page, "a keyed lighthouse", steps=6, seed=21, size=64)
    record_status_texts(page)
    page.click("#generate")
    sync_api.expect(page.locator("#job-status")).to_have_text(re.compile(r"^Done"))
    steps_seen = [text for text in page.evaluate("window.statusTexts") if re.fullmatch(r"Step \d+ of 6", text)]
    assert steps_seen and steps_seen[-1] == "Step 6 of 6"  # the event stream, read with the key
    assert image_from_src(page, "img.result-image").size == (64, 64)
    page.wait_for_function("() => [...document.querySelectorAll('#gallery img')].some(i => i.naturalWidth > 0)")
    assert page.eval_on_selector("#gallery img", "image => image.src").startswith("blob:")

    # The key survives a reload; without it the API refuses the same requests.
    page.reload()
    sync_api.expect(page.locator("#model option[value=demo]")).to_have_count(1)
    assert httpx.get(f"{keyed_server.url}/models", timeout=10).status_code == 401
    screenshot(page, "ui-with-key.png")
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
