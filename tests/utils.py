"""Factories shared by the tests: images, base64, waiting for a server."""

from __future__ import annotations

import base64
import io
import socket
import time

import httpx
import numpy as np
from PIL import Image


def gradient_image(width: int = 128, height: int = 128) -> Image.Image:
    """A smooth test picture: red left to right, green top to bottom, blue in one corner."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, 255 - (x + y) / 2], axis=-1).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def half_mask(width: int, height: int) -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left half."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 2, 0, width, height))
    return mask


def to_b64(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def from_b64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(base_url: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    last_error: object = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/health", timeout=5)
            if response.status_code == 200:
                return response.json()
            last_error = response.text
        except httpx.HTTPError as error:
            last_error = error
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} not healthy after {timeout_s}s: {last_error}")


def parse_sse(text: str) -> list[tuple[str, dict]]:
    """(event, data) pairs of a Server-Sent Events body; comments (keep-alive pings) are skipped."""
    import json

    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        kind, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                kind = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data.append(line.removeprefix("data:").strip())
        if data:
            events.append((kind, json.loads("\n".join(data))))
    return events


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.05):
    """Poll until predicate() is truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s}s")


class StepGate:
    """Holds the real engine's jobs with a given prompt at their first denoising step until the test opens the
    gate (or the job is cancelled): a deterministic "slow job". It is a worker observer, so it runs on the worker
    thread inside the step callback; cancelling the held job releases it at once, like a step ending."""

    def __init__(self, client, prompt: str):
        import threading

        self.prompt = prompt
        self.reached = threading.Event()
        self.opened = threading.Event()
        client.app.state.engine.worker.add_observer(self._observe)

    def _observe(self, job, event) -> None:
        if event.kind != "progress" or job.request.prompt != self.prompt or self.opened.is_set():
            return
        self.reached.set()
        while not self.opened.wait(0.02) and not job.cancel_requested.is_set():
            pass

    def wait_reached(self, timeout_s: float = 60.0) -> None:
        if not self.reached.wait(timeout_s):
            raise TimeoutError(f"no job with prompt {self.prompt!r} reached its first step")

    def open(self) -> None:
        self.opened.set()
