"""A bare diffusers process for the benchmark: `pipe()` and nothing else, driven by JSON lines on stdin.

    python -m models.bench.bare --folder PATH [--variant eager|openvino|openvino-unet|per-request|compile|...]

Answers one JSON line per command on stdout: {"op": "generate", "prompt", "size", "steps", "seed", "guidance",
"image": bool} -> {"seconds", "unet_s", "vae_s", "png"?} (unet_s, vae_s: time in UNet calls and in VAE decoder
calls); {"op": "rss"} -> {"rss_mb"}; {"op": "quit"}. Logs go to stderr.
Variant `openvino` is the server's backend (UNet and VAE decoder on OpenVINO), `openvino-unet` its UNet alone (what
the backend was before the decoder joined it). Variant `per-request` is seed 000's design: a pipeline built with
from_pretrained for every request.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from diffusers import DiffusionPipeline

logger = logging.getLogger("models.bench.bare")
VARIANTS = ("eager", "openvino", "openvino-unet", "per-request", "compile", "channels-last", "threads1")


class Bare:
    def __init__(self, folder: Path, variant: str, device: str, cache_dir: Path):
        self.folder, self.variant, self.device, self.cache_dir = folder, variant, torch.device(device), cache_dir
        if variant == "threads1":
            torch.set_num_threads(1)
        self.pipe = None if variant == "per-request" else self._build()

    def _build(self) -> DiffusionPipeline:
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        pipe = DiffusionPipeline.from_pretrained(self.folder, torch_dtype=dtype).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        if self.variant in ("openvino", "openvino-unet"):
            from models.engine import openvino_vae
            from models.engine.backends import apply_backend

            apply_backend(pipe, "openvino", self.device, self.cache_dir, self.folder.name)
            if self.variant == "openvino-unet":
                openvino_vae.detach(pipe.vae)
        elif self.variant == "channels-last":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        elif self.variant == "compile":
            pipe.unet = torch.compile(pipe.unet)
        self._time_calls(pipe.unet, "unet_s")
        self._time_calls(pipe.vae.decoder, "vae_s")
        return pipe

    def _time_calls(self, module: torch.nn.Module, total: str) -> None:
        """Add up the time spent in `module`'s calls into the attribute `total`, so a row can tell the denoising
        loop and the decode from the rest. Hooks run around the routed forward too (nn.Module.__call__)."""
        setattr(self, total, 0.0)
        started: list[float] = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))

        def done(*_: Any) -> None:
            setattr(self, total, getattr(self, total) + time.perf_counter() - started.pop())

        module.register_forward_hook(done)

    def generate(self, command: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        pipe = self.pipe or self._build()
        self.unet_s = self.vae_s = 0.0
        generator = torch.Generator("cpu").manual_seed(int(command["seed"]))
        with torch.inference_mode():
            image = pipe(command["prompt"], num_inference_steps=int(command["steps"]), width=int(command["size"]),
                         height=int(command["size"]), guidance_scale=float(command.get("guidance", 7.0)),
                         generator=generator).images[0]
        answer: dict[str, Any] = {"seconds": time.perf_counter() - started, "unet_s": self.unet_s,
                                  "vae_s": self.vae_s}
        if command.get("image"):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            answer["png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
        return answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="A diffusers folder (model_index.json).")
    parser.add_argument("--variant", choices=VARIANTS, default="eager")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/sdserve"))
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    started = time.perf_counter()
    bare = Bare(arguments.folder, arguments.variant, arguments.device, arguments.cache_dir)
    _answer({"ready": True, "load_s": time.perf_counter() - started})
    process = psutil.Process()
    for line in sys.stdin:
        command = json.loads(line)
        if command["op"] == "quit":
            break
        if command["op"] == "rss":
            _answer({"rss_mb": process.memory_info().rss / 2**20})
        elif command["op"] == "generate":
            _answer(bare.generate(command))


def _answer(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
