"""Where the server's time goes: py-spy samples a running server while it answers requests over HTTP.

py-spy is not a dependency: install it anywhere (`pipx install py-spy`, or a throwaway venv) and put it on PATH
or pass --py-spy. Its samples (every thread that is not idle) are grouped by the first frame that names a stage.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from models.bench.rows import Context

# (stage, substrings of a frame "function (file:line)"); a sample belongs to the deepest frame that matches one.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("UNet", ("unets/unet_2d_condition.py", "openvino_unet.py")),
    ("VAE decode", ("autoencoders/", "openvino_vae.py")),
    ("text encoder", ("models/clip/modeling_clip.py", "tokenization_clip")),
    ("scheduler step", ("diffusers/schedulers/",)),
    ("image post-processing (tensor to PIL)", ("image_processor.py",)),
    ("PNG encoding and saving", ("PngImagePlugin", "PIL/Image.py", "image_files.py")),
    ("job record (database)", ("sqlalchemy", "models/store.py")),
    ("base64 and JSON answer", ("api/images.py", "base64.py", "json/encoder.py", "fastapi/encoders.py",
                                "pydantic")),
    ("rest of the pipeline call (diffusers)", ("pipeline_stable_diffusion.py",)),
    ("HTTP and event loop (uvicorn, starlette)", ("uvicorn", "starlette", "asyncio", "h11", "httptools")),
]


# Leaf frames of a thread that waits (queues, the event loop's select, the job recorder, tqdm's monitor): py-spy's
# idle detection misses them, so they are counted apart and left out of the shares.
WAITING = ("Condition.wait", "Event.wait", "Queue.get", "Runner.run", "select (selectors.py", "sleep")


@dataclass
class Profile:
    samples: int  # working samples: those the shares are of
    waiting: int  # samples of threads waiting, left out
    seconds: float
    requests: int
    stages: dict[str, float]  # share of samples, 0..1
    top_frames: list[tuple[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_py_spy(explicit: str | None) -> str | None:
    return explicit or shutil.which("py-spy")


def profile_server(ctx: Context, py_spy: str, requests: int) -> Profile:
    size, steps = ctx.config.demo_size, ctx.config.demo_steps
    server = ctx.server()
    server.text2img(ctx.body(size, steps))
    raw = ctx.logs / "server-profile.txt"
    recorder = subprocess.Popen([py_spy, "record", "--pid", str(server.process.pid), "--format", "raw",
                                 "--output", str(raw), "--rate", "50"],
                                stdout=subprocess.DEVNULL, stderr=(ctx.logs / "py-spy.log").open("wb"))
    time.sleep(1.0)  # py-spy attaches
    started = time.perf_counter()
    for _ in range(requests):
        server.text2img(ctx.body(size, steps))
    seconds = time.perf_counter() - started
    recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    recorder.wait(timeout=60)
    return summarise(raw.read_text(encoding="utf-8", errors="replace"), seconds, requests)


def summarise(collapsed: str, seconds: float, requests: int) -> Profile:
    """Group py-spy's collapsed stacks ("frame;frame;... count") into stages and leaf functions."""
    stages: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = waiting = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        if frames[-1].startswith(WAITING):
            waiting += count
            continue
        total += count
        stages[_stage(frames)] += count
        leaves[frames[-1]] += count
    shares = {stage: count / total for stage, count in stages.most_common()} if total else {}
    top = [(frame, count / total) for frame, count in leaves.most_common(8)] if total else []
    return Profile(total, waiting, seconds, requests, shares, top)


def _stage(frames: list[str]) -> str:
    for frame in reversed(frames):  # the deepest frame that names a stage decides
        for stage, needles in STAGES:
            if any(needle in frame for needle in needles):
                return stage
    return "other (threads, queue, Python start-up of a call)"


def markdown(profile: Profile) -> list[str]:
    lines = ["", f"Profile of the server path (py-spy, {profile.requests} requests of the demo over HTTP, "
                 f"{profile.samples} samples of working threads in {profile.seconds:.1f}s; "
                 f"{profile.waiting} samples of waiting threads left out)", "",
             "| stage | share of samples |", "|---|---|"]
    lines += [f"| {stage} | {share:.1%} |" for stage, share in profile.stages.items()]
    lines += ["", "Hottest leaf frames: " + "; ".join(f"{frame} {share:.1%}" for frame, share in profile.top_frames)]
    return lines
