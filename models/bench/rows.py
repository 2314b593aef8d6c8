"""The comparisons. Each row function takes the run's context and returns Comparisons (or a Skipped with why).

Sides alternate request by request (or block by block where a side is a sequence, as LoRA switching is), and the
order flips every round, so neither side always runs first after the other.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from models.bench.processes import BareProcess, ServerProcess
from models.bench.stats import Comparison, Side, Skipped
from models.registry import builtins as demo

logger = logging.getLogger(__name__)

PROMPT = "a lighthouse at dusk"
BUILTINS = {"demo": "tiny", "sd15-random": "sd15"}  # registry name -> demo builtin


@dataclass
class Config:
    out: Path
    work: Path  # registry, outputs, database, LoRAs: made fresh for the run
    cache_dir: Path  # builtin models and OpenVINO exports: kept between runs
    device: str = "cpu"
    repeats: int = 5
    demo_size: int = 256
    demo_steps: int = 20
    sd15_size: int = 256
    sd15_steps: int = 2
    sd15_repeats: int = 2
    fast_models: list[str] = field(default_factory=lambda: ["demo", "sd15-random"])
    clients: list[int] = field(default_factory=lambda: [1, 4, 16])
    concurrency_rounds: int = 2
    # Fewer steps than the other demo rows: the six concurrency rows make 256 images, the most of any row, and the
    # whole command must fit in 15 minutes on 2 cores; batching shares each step's UNet call, so the step count
    # changes its gain little.
    concurrency_steps: int = 10
    batch_window_ms: int = 20
    lora_requests: int = 150  # a side: 300 requests in all, alternating blocks
    small_size: int = 64  # LoRA and model switching: many requests, so small images
    small_steps: int = 4
    switch_requests: int = 60
    cold_starts: int = 2
    block: int = 25


Row = Comparison | Skipped


class Context:
    """What rows share: the config, the registry and LoRA files, one long-lived server, seeds."""

    def __init__(self, config: Config):
        self.config = config
        self._seed = 1000
        self._server: ServerProcess | None = None
        self.logs = config.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.registry = config.work / "registry.yaml"
        self._prepare()

    # -- set-up --------------------------------------------------------------------------------------------
    def _prepare(self) -> None:
        work = self.config.work
        work.mkdir(parents=True, exist_ok=True)
        tiny = self.folder("demo")
        second = work / "demo-b"  # a second cached base for model switching: the demo's files, another name
        if not second.exists():
            shutil.copytree(tiny, second)
        loras = work / "loras"
        for index, name in enumerate(("a", "b", "c")):
            if not (loras / name / "pytorch_lora_weights.safetensors").exists():
                make_lora(tiny, loras / name, seed=index + 1)
        lines = ["models:", "  demo:", "    source: demo:tiny", "  demo-b:", f"    source: {second}",
                 "  sd15-random:", "    source: demo:sd15"]
        for name in ("a", "b", "c"):
            lines += [f"  lora-{name}:", "    kind: lora", f"    source: {loras / name}", "    base: demo"]
        self.registry.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def folder(self, model: str) -> Path:
        return demo.ensure_builtin(BUILTINS[model], self.config.cache_dir)

    def seed(self) -> int:
        """A new seed for every request: the server caches results of repeated seeded requests."""
        self._seed += 1
        return self._seed

    def server_env(self, **extra: str) -> dict[str, str]:
        work = self.config.work
        env = {
            "SDSERVE_REGISTRY_PATH": str(self.registry), "SDSERVE_CACHE_DIR": str(self.config.cache_dir),
            "SDSERVE_OUTPUT_DIR": str(work / "outputs"), "SDSERVE_DATA_DIR": str(work / "data"),
            "SDSERVE_DEVICE": self.config.device, "SDSERVE_DEFAULT_MODEL": "demo", "SDSERVE_MAX_STEPS": "1000",
            "SDSERVE_QUEUE_SIZE": "64", "SDSERVE_LOG_LEVEL": "WARNING",
        }
        return env | extra

    def start_server(self, name: str, **extra: str) -> ServerProcess:
        # Each server its own database folder: two processes never share one SQLite file here.
        extra = {"SDSERVE_DATA_DIR": str(self.config.work / f"data-{name}")} | extra
        server = ServerProcess(self.server_env(**extra), self.logs / f"server-{name}.log")
        server.wait_healthy()
        return server

    def server(self) -> ServerProcess:
        """The server most rows use, started once."""
        if self._server is None:
            self._server = self.start_server("main")
        return self._server

    def bare(self, model: str, variant: str = "eager") -> BareProcess:
        process = BareProcess(self.folder(model), variant, self.logs / f"bare-{model}-{variant}.log",
                              self.config.device, self.config.cache_dir)
        process.wait_ready()
        return process

    def body(self, size: int, steps: int, **extra: Any) -> dict[str, Any]:
        return {"prompt": PROMPT, "width": size, "height": size, "steps": steps, "cfg_scale": 7.0,
                "seed": self.seed()} | extra

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def alternate(rounds: int, first: Callable[[], None], second: Callable[[], None]) -> None:
    """first, second; second, first; ... so neither side always runs right after the other."""
    for index in range(rounds):
        for run in (first, second) if index % 2 == 0 else (second, first):
            run()


# -- server vs bare pipe() ------------------------------------------------------------------------------------
def server_vs_bare(ctx: Context) -> list[Row]:
    size, steps = ctx.config.demo_size, ctx.config.demo_steps
    server, bare = ctx.server(), ctx.bare("demo")
    try:
        server.text2img(ctx.body(size, steps))  # warm-up: first-call allocations on both sides
        bare.generate(PROMPT, size, steps, ctx.seed())
        a, b = Side("server: POST /text2img over HTTP"), Side("bare diffusers pipe(), own process")
        alternate(ctx.config.repeats, lambda: a.samples.append(server.text2img(ctx.body(size, steps))[0]),
                  lambda: b.samples.append(bare.generate(PROMPT, size, steps, ctx.seed())["seconds"]))
    finally:
        bare.stop()
    return [Comparison("server vs bare pipe()", "demo", f"{size}x{size}, {steps} steps", "s/image", a, b,
                       notes="server time includes HTTP, JSON, PNG and base64 encoding, saving the PNG and the "
                             "job record")]


# -- seed 000's design: a pipeline built per request ---------------------------------------------------------------
def per_request_pipeline(ctx: Context) -> list[Row]:
    size, steps = ctx.config.demo_size, ctx.config.demo_steps
    server, bare = ctx.server(), ctx.bare("demo", "per-request")
    try:
        bare.generate(PROMPT, size, steps, ctx.seed())
        a, b = Side("server (pipeline loaded once)"), Side("seed 000: from_pretrained + pipe() per request")
        alternate(ctx.config.repeats, lambda: a.samples.append(server.text2img(ctx.body(size, steps))[0]),
                  lambda: b.samples.append(bare.generate(PROMPT, size, steps, ctx.seed())["seconds"]))
    finally:
        bare.stop()
    return [Comparison("seed 000 design vs server", "demo", f"{size}x{size}, {steps} steps", "s/image", a, b,
                       notes="on a real checkpoint the per-request load is seconds to minutes, not the demo's")]


# -- concurrency ------------------------------------------------------------------------------------------------
def _burst(server: ServerProcess, ctx: Context, clients: int, per_client: int, size: int, steps: int
           ) -> tuple[float, list[float]]:
    """`clients` threads each send `per_client` requests at once; returns images/s and every request's latency."""
    latencies: list[float] = []
    errors: list[BaseException] = []
    bodies = [[ctx.body(size, steps) for _ in range(per_client)] for _ in range(clients)]
    lock = threading.Lock()

    def client(mine: list[dict[str, Any]]) -> None:
        with httpx.Client(base_url=server.url, timeout=900.0) as http:
            for body in mine:
                try:
                    seconds, _ = server.text2img(body, http)
                except BaseException as error:  # noqa: BLE001 - reported after the burst
                    errors.append(error)
                    return
                with lock:
                    latencies.append(seconds)

    threads = [threading.Thread(target=client, args=(mine,)) for mine in bodies]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed in a burst of {clients} clients: {errors[0]}")
    return clients * per_client / (time.perf_counter() - started), latencies


def concurrency(ctx: Context) -> list[Row]:
    size, steps = ctx.config.demo_size, ctx.config.concurrency_steps
    rows: list[Row] = []
    modes = ["micro-batching off", "micro-batching on"]
    bare = ctx.bare("demo")
    try:
        bare.generate(PROMPT, size, steps, ctx.seed())
        for mode in modes:
            batching = mode == "micro-batching on"
            server = ctx.start_server(
                f"batching-{'on' if batching else 'off'}",
                SDSERVE_BATCH_WINDOW_MS=str(ctx.config.batch_window_ms),
                SDSERVE_BATCH_MAX_IMAGES="8" if batching else "1",  # 1 turns micro-batching off
            )
            try:
                server.text2img(ctx.body(size, steps))
                for clients in ctx.config.clients:
                    rows.append(_concurrency_row(ctx, server, bare, mode, clients, size, steps))
            finally:
                server.stop()
    finally:
        bare.stop()
    return rows


def _concurrency_row(ctx: Context, server: ServerProcess, bare: BareProcess, mode: str, clients: int, size: int,
                     steps: int) -> Comparison:
    per_client = max(1, 8 // clients)  # at least 8 images a round, whatever the number of clients
    images = clients * per_client
    a = Side(f"server, {clients} concurrent client(s), {mode}")
    b = Side(f"bare pipe(), the same {images} images one after another")
    latencies: list[float] = []

    def server_side() -> None:
        throughput, seconds = _burst(server, ctx, clients, per_client, size, steps)
        a.samples.append(throughput)
        latencies.extend(seconds)

    def bare_side() -> None:
        started = time.perf_counter()
        for _ in range(images):
            bare.generate(PROMPT, size, steps, ctx.seed())
        b.samples.append(images / (time.perf_counter() - started))

    alternate(ctx.config.concurrency_rounds, server_side, bare_side)
    latency = Side("latency", latencies)
    return Comparison(f"concurrency {clients}, {mode}", "demo", f"{size}x{size}, {steps} steps, {images} images",
                      "images/s", a, b, higher_is_better=True,
                      notes=f"server request latency p50 {latency.median:.3f}s, p95 {latency.p95:.3f}s",
                      extra={"latency_p50_s": latency.median, "latency_p95_s": latency.p95,
                             "clients": clients, "images_per_round": images})


# -- LoRA switching and resident memory ------------------------------------------------------------------------
def lora_switching(ctx: Context) -> list[Row]:
    size, steps, block = ctx.config.small_size, ctx.config.small_steps, ctx.config.block
    server = ctx.server()
    names = ["lora-a", "lora-b", "lora-c"]
    for name in names:  # load all three once, so the rows measure switching, not first loads
        server.text2img(ctx.body(size, steps, loras=[{"name": name}]))
    a, b = Side("three LoRAs in turn"), Side("the same LoRA every time")
    rss = [server.rss_mb()]
    counter = iter(range(10**9))
    blocks = max(1, ctx.config.lora_requests // block)

    def rotating() -> None:
        for _ in range(block):
            lora = names[next(counter) % 3]
            a.samples.append(server.text2img(ctx.body(size, steps, loras=[{"name": lora}]))[0])
        rss.append(server.rss_mb())

    def same() -> None:
        for _ in range(block):
            b.samples.append(server.text2img(ctx.body(size, steps, loras=[{"name": "lora-a"}]))[0])
        rss.append(server.rss_mb())

    alternate(blocks, rotating, same)
    total = len(a.samples) + len(b.samples)
    growth = rss[-1] - rss[1] if len(rss) > 2 else 0.0
    return [Comparison("LoRA switching", "demo", f"{size}x{size}, {steps} steps, {total} requests", "s/image", a, b,
                       notes=f"server RSS {rss[0]:.0f} MB before, {rss[-1]:.0f} MB after {total} requests "
                             f"(max {max(rss):.0f} MB; {growth:+.0f} MB after the first block)",
                       extra={"rss_mb": rss, "requests": total})]


# -- model switching between two cached bases ------------------------------------------------------------------------
def model_switching(ctx: Context) -> list[Row]:
    size, steps = ctx.config.small_size, ctx.config.small_steps
    block = max(1, min(ctx.config.block, ctx.config.switch_requests // 4))
    server = ctx.server()
    for model in ("demo", "demo-b"):
        server.text2img(ctx.body(size, steps, model=model))
    a, b = Side("demo and demo-b in turn"), Side("demo every time")
    counter = iter(range(10**9))

    def switching() -> None:
        for _ in range(block):
            model = ("demo", "demo-b")[next(counter) % 2]
            a.samples.append(server.text2img(ctx.body(size, steps, model=model))[0])

    def same() -> None:
        for _ in range(block):
            b.samples.append(server.text2img(ctx.body(size, steps, model="demo"))[0])

    alternate(max(1, ctx.config.switch_requests // block), switching, same)
    return [Comparison("model switching (two cached bases)", "demo", f"{size}x{size}, {steps} steps", "s/image",
                       a, b, notes="both bases stay loaded (SDSERVE_MAX_LOADED_MODELS=2): a switch is a lookup")]


# -- cold start to first image ----------------------------------------------------------------------------------
def cold_start(ctx: Context) -> list[Row]:
    size, steps = ctx.config.demo_size, ctx.config.demo_steps
    a, b = Side("server: process start to first image over HTTP"), Side("bare: process start to first pipe() image")

    def server_side() -> None:
        server = ServerProcess(ctx.server_env(SDSERVE_DATA_DIR=str(ctx.config.work / "data-cold")),
                               ctx.logs / "server-cold.log")
        try:
            server.wait_healthy()
            server.text2img(ctx.body(size, steps))
            a.samples.append(time.perf_counter() - server.started)
        finally:
            server.stop()

    def bare_side() -> None:
        bare = BareProcess(ctx.folder("demo"), "eager", ctx.logs / "bare-cold.log", ctx.config.device)
        try:
            bare.wait_ready()
            bare.generate(PROMPT, size, steps, ctx.seed())
            b.samples.append(time.perf_counter() - bare.started)
        finally:
            bare.stop()

    alternate(ctx.config.cold_starts, server_side, bare_side)
    return [Comparison("cold start to first image", "demo", f"{size}x{size}, {steps} steps", "s", a, b,
                       notes="the server also opens its database and loads its default model before /health")]


# -- fast path vs eager -------------------------------------------------------------------------------------------
def fast_path(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    for model in ctx.config.fast_models:
        if ctx.config.device != "cpu":
            rows.append(Skipped(f"fast path vs eager, {model}", "the OpenVINO backend is for CPUs"))
            continue
        rows.append(_variant_row(ctx, model, "openvino", "fast path (OpenVINO UNet + VAE decoder) vs eager"))
    return rows


def torch_options(ctx: Context) -> list[Row]:
    return [_variant_row(ctx, "demo", variant, f"torch option {variant} vs eager")
            for variant in ("channels-last", "threads1", "compile")]


def _variant_row(ctx: Context, model: str, variant: str, title: str) -> Comparison:
    size, steps, repeats = ((ctx.config.sd15_size, ctx.config.sd15_steps, ctx.config.sd15_repeats)
                            if model == "sd15-random" else (ctx.config.demo_size, ctx.config.demo_steps,
                                                            ctx.config.repeats))
    eager = ctx.bare(model, "eager")
    try:
        fast = ctx.bare(model, variant)
        try:
            seed = ctx.seed()  # the same seed on both sides: the images must match
            first_fast = fast.generate(PROMPT, size, steps, seed, image=True)
            first_eager = eager.generate(PROMPT, size, steps, seed, image=True)
            difference = np.abs(_pixels(first_fast["png"]) - _pixels(first_eager["png"]))
            a, b = Side(f"{variant} pipe()"), Side("eager diffusers pipe()")
            unet_a, unet_b = Side("UNet calls"), Side("UNet calls")
            vae_a, vae_b = Side("VAE decode"), Side("VAE decode")

            def run(process: BareProcess, side: Side, unet: Side, vae: Side) -> None:
                answer = process.generate(PROMPT, size, steps, ctx.seed())
                side.samples.append(answer["seconds"])
                unet.samples.append(answer["unet_s"])
                vae.samples.append(answer["vae_s"])

            alternate(repeats, lambda: run(fast, a, unet_a, vae_a), lambda: run(eager, b, unet_b, vae_b))
            load = f"load {fast.load_s:.1f}s vs {eager.load_s:.1f}s"
        finally:
            fast.stop()
    finally:
        eager.stop()
    return Comparison(title, model, f"{size}x{size}, {steps} steps", "s/image", a, b,
                      notes=f"UNet calls alone {unet_a.median:.3f}s vs {unet_b.median:.3f}s per image "
                            f"({unet_b.median / unet_a.median:.2f}x), VAE decode alone {vae_a.median:.3f}s vs "
                            f"{vae_b.median:.3f}s ({vae_b.median / vae_a.median:.2f}x); images differ by at most "
                            f"{difference.max():.0f}/255 (mean {difference.mean():.3f}); {load} "
                            f"(first call of {variant}: {first_fast['seconds']:.1f}s)",
                      extra={"unet_s": {"a": unet_a.samples, "b": unet_b.samples},
                             "vae_s": {"a": vae_a.samples, "b": vae_b.samples},
                             "max_pixel_difference": float(difference.max()),
                             "mean_pixel_difference": float(difference.mean()),
                             "load_s": {"a": fast.load_s, "b": eager.load_s}, "first_call_s": first_fast["seconds"]})


def _pixels(png_b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


# -- LoRA files for the demo -----------------------------------------------------------------------------------------
def make_lora(model_folder: Path, folder: Path, seed: int, rank: int = 4) -> None:
    """A random LoRA for the demo UNet's attention layers, saved as diffusers' training scripts save theirs."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_folder / "unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    state = {key: torch.randn(value.shape, generator=generator) * 0.3
             for key, value in sorted(get_peft_model_state_dict(unet).items())}
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                              safe_serialization=True)
